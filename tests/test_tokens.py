"""Token cache and LM windows: encoded once, every window once per epoch, batches a pure function of the step;
a prepared shard folder gives the same windows, and the same perplexity, as the source it was made from."""

import numpy as np
import pytest
import torch

import lmforge
from lmforge.data import tokens
from lmforge.data.shards import prepare_shards
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, MixedWindows, ShardedTokens, lm_windows, token_cache
from lmforge.errors import UserError
from lmforge.evaluate.perplexity import evaluate_source
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["人民日报社论", "新年快乐 happy new year"] * 10, vocab_size=300, show_progress=False)


def test_cache_is_built_once_and_reused(tmp_path, tokenizer, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"第{i}段：人民日报社论，新年快乐。" for i in range(200)), encoding="utf-8")
    first = token_cache(str(corpus), "train", tokenizer, root=tmp_path, progress=False)
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    assert (first == tokenizer.eos_id).sum() == (first == tokenizer.bos_id).sum() > 150

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(tokens, "_encoded_documents", no_encoding)
    assert np.array_equal(token_cache(str(corpus), "train", tokenizer, root=tmp_path, progress=False), first)
    # A different split or a changed file is a different cache entry.
    corpus.write_text("另一段文字。\n" * 300, encoding="utf-8")
    with pytest.raises(AssertionError, match="reused"):
        token_cache(str(corpus), "train", tokenizer, root=tmp_path, progress=False)


def test_every_window_once_per_epoch_in_a_seeded_order():
    windows = LMWindows(np.arange(10 * 8 + 1, dtype=np.uint16), context=8, seed=5)
    assert len(windows) == 10
    seen = np.concatenate([windows.training_batch(step, 2)[0][:, 0].numpy() // 8 for step in range(5)])
    assert sorted(seen.tolist()) == list(range(10))
    second_epoch = np.concatenate([windows.training_batch(step, 2)[0][:, 0].numpy() // 8 for step in range(5, 10)])
    assert sorted(second_epoch.tolist()) == list(range(10)) and second_epoch.tolist() != seen.tolist()
    inputs, targets = windows.training_batch(3, 2)
    again = LMWindows(np.arange(10 * 8 + 1, dtype=np.uint16), context=8, seed=5).training_batch(3, 2)
    assert (inputs == again[0]).all() and (targets == inputs + 1).all()


def test_mixed_windows_draw_their_share_and_each_corpus_once_per_epoch():
    main = LMWindows(np.arange(40 * 4 + 1, dtype=np.uint16), context=4, seed=1)  # windows start at 0, 4, ..., 156
    second = LMWindows(np.arange(1000, 1000 + 10 * 4 + 1, dtype=np.uint16), context=4, seed=2)
    mixed = MixedWindows(main, second, share=0.25)
    firsts = [mixed.training_batch(step, 4)[0][:, 0].tolist() for step in range(10)]  # 40 rows: 10 mixed, 30 main
    from_second = [first for batch in firsts for first in batch if first >= 1000]
    assert sorted(from_second) == [1000 + 4 * i for i in range(10)]  # all 10 windows of the second, once
    from_main = [first for batch in firsts for first in batch if first < 1000]
    assert len(from_main) == 30 and len(set(from_main)) == 30
    assert all(len(batch) == 4 for batch in firsts)
    again = MixedWindows(main, second, share=0.25).training_batch(7, 4)
    assert (again[0] == mixed.training_batch(7, 4)[0]).all() and (again[1] == again[0] + 1).all()
    ranks = [mixed.training_batch(7, 4, rank, 2)[0] for rank in (0, 1)]  # two processes split the global batch
    assert sorted(torch.cat(ranks)[:, 0].tolist()) == sorted(again[0][:, 0].tolist())
    with pytest.raises(UserError, match="share"):
        MixedWindows(main, second, share=1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"第{i}段：人民日报社论{'，新年快乐' * (i % 5)}。happy new year {i}" for i in range(1500)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tokenizer):
    """The corpus through `lmforge data prepare`, at the default split fractions, in shards of 500 tokens."""
    folder = tmp_path_factory.mktemp("prepared")
    prepare_shards(str(corpus), tokenizer, folder, splits=("train", "valid"), shard_tokens=500, progress=False)
    return folder


@pytest.mark.parametrize("split", ["train", "valid"])
def test_windows_of_a_prepared_folder_are_the_windows_of_its_source(corpus, prepared, tokenizer, tmp_path, split):
    from_cache = lm_windows(str(corpus), split, tokenizer, context=48, seed=2, root=tmp_path, progress=False)
    from_shards = lm_windows(str(prepared), split, tokenizer, context=48, seed=2)
    assert isinstance(from_shards.tokens, ShardedTokens) and isinstance(from_cache.tokens, np.ndarray)
    assert len(from_shards) == len(from_cache) > 1
    for step in range(5):
        for shard_batch, cache_batch in zip(from_shards.training_batch(step, 4), from_cache.training_batch(step, 4)):
            assert torch.equal(shard_batch, cache_batch)
    for (inputs, targets), (cache_inputs, cache_targets) in zip(
        from_shards.evaluation_batches(8), from_cache.evaluation_batches(8), strict=True
    ):
        assert torch.equal(inputs, cache_inputs) and torch.equal(targets, cache_targets)


def test_perplexity_on_a_prepared_folder_equals_perplexity_on_its_text_file(
    corpus, prepared, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Decoder(
        DecoderConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
            max_position_embeddings=32,
        )  # fmt: skip
    )
    save_model(tmp_path / "run", model)
    tokenizer.save(tmp_path / "run")
    lm = lmforge.load(tmp_path / "run", device="cpu")
    from_text = evaluate_source(lm, str(corpus), "valid")
    from_shards = evaluate_source(lm, str(prepared), "valid")
    assert from_text["tokens"] > 32 and from_shards == from_text
