"""Token cache and LM windows: encoded once, every window once per epoch, batches a pure function of the step."""

import numpy as np
import pytest

from lmforge.data import tokens
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, token_cache


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
