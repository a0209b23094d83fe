"""Sharded token data: the token cache's stream cut into files, the same for any number of workers, read lazily."""

import pickle
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from lmforge.cli import app, main
from lmforge.data import shards
from lmforge.data.shards import prepare_shards
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, ShardedTokens, read_index, split_tokens, token_cache
from lmforge.errors import UserError

SHARD_TOKENS = 500
SPLIT_FRACTIONS = (0.1, 0.05)  # valid, test: enough valid documents for more than one shard


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["人民日报社论", "新年快乐 happy new year"] * 10, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"第{i}段：人民日报社论{'，新年快乐' * (i % 7)}。happy new year {i}" for i in range(400)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tokenizer):
    folder = tmp_path_factory.mktemp("prepared")
    prepare_shards(
        str(corpus), tokenizer, folder, splits=("train", "valid", "test"), shard_tokens=SHARD_TOKENS,
        valid_fraction=SPLIT_FRACTIONS[0], test_fraction=SPLIT_FRACTIONS[1], progress=False,
    )  # fmt: skip
    return folder


def cached(corpus, split, tokenizer, root):
    return token_cache(str(corpus), split, tokenizer, *SPLIT_FRACTIONS, root=root, progress=False)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_shards_hold_exactly_the_token_cache_stream(prepared, corpus, tokenizer, tmp_path, split):
    tokens = ShardedTokens(prepared, split, tokenizer, verify=True)
    expected = cached(corpus, split, tokenizer, tmp_path)
    entry = read_index(prepared)["splits"][split]
    assert len(tokens) == len(expected) == entry["tokens"] > SHARD_TOKENS
    assert np.array_equal(tokens[:], expected)
    assert entry["documents"] == (expected == tokenizer.bos_id).sum() == (expected == tokenizer.eos_id).sum()
    sizes = [shard["tokens"] for shard in entry["shards"]]
    assert sizes[:-1] == [SHARD_TOKENS] * (len(sizes) - 1) and 0 < sizes[-1] <= SHARD_TOKENS
    assert [shard["file"] for shard in entry["shards"]] == [f"{split}_{k:05d}.bin" for k in range(len(sizes))]


def test_slices_and_windows_across_shard_boundaries(prepared, corpus, tokenizer, tmp_path):
    tokens, expected = ShardedTokens(prepared, "train"), cached(corpus, "train", tokenizer, tmp_path)
    edges = [(490, 510), (499, 500), (500, 501), (250, 1750), (0, 0), (-7, None), (len(expected) - 3, 10**9)]
    for start, stop in edges:
        assert np.array_equal(tokens[start:stop], expected[start:stop]), (start, stop)
    assert tokens[SHARD_TOKENS] == expected[SHARD_TOKENS] and tokens[-1] == expected[-1] == tokenizer.eos_id
    with pytest.raises(IndexError):
        tokens[len(expected)]
    pickled = pickle.dumps(tokens)  # e.g. to a DataLoader worker: the maps are reopened there, not copied
    assert len(pickled) < 10_000 and np.array_equal(pickle.loads(pickled)[400:1600], expected[400:1600])
    # 64 does not divide 500, so windows straddle every shard boundary; batches are a pure function of the step.
    sharded, flat = LMWindows(tokens, context=64, seed=3), LMWindows(expected, context=64, seed=3)
    assert len(sharded) == len(flat) > 2 * len(tokens.shards)
    for step in range(3 * len(flat) // 8):  # three epochs
        assert all((a == b).all() for a, b in zip(sharded.training_batch(step, 8), flat.training_batch(step, 8)))
    for (inputs, targets), (expected_inputs, expected_targets) in zip(
        sharded.evaluation_batches(16), flat.evaluation_batches(16), strict=True
    ):
        assert (inputs == expected_inputs).all() and (targets == expected_targets).all()


def test_the_same_shards_for_any_number_of_workers(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ENCODE_BATCH", 16)  # many batches in flight at once, to catch any reordering
    one, two = tmp_path / "one", tmp_path / "two"
    index = prepare_shards(str(corpus), tokenizer, one, shard_tokens=SHARD_TOKENS, workers=1, progress=False)
    assert prepare_shards(str(corpus), tokenizer, two, shard_tokens=SHARD_TOKENS, workers=2, progress=False) == index
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            assert (one / shard["file"]).read_bytes() == (two / shard["file"]).read_bytes()
    assert Tokenizer.load(two).fingerprint == tokenizer.fingerprint  # the folder carries its tokenizer


def test_a_damaged_shard_or_another_tokenizer_is_refused(corpus, tokenizer, tmp_path):
    folder = tmp_path / "data"
    prepare_shards(str(corpus), tokenizer, folder, shard_tokens=SHARD_TOKENS, progress=False)
    shard = folder / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    ShardedTokens(folder, "train")  # sizes are checked on opening, contents only on request
    with pytest.raises(UserError, match=r"train_00001.bin does not match its SHA-256 .* data prepare --overwrite"):
        ShardedTokens(folder, "train", verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match=r"train_00001.bin has 998 bytes, its index says 1,000 \(truncated"):
        ShardedTokens(folder, "train")
    shard.unlink()
    with pytest.raises(UserError, match="train_00001.bin is missing"):
        ShardedTokens(folder, "train")
    other = Tokenizer.train(["完全不同的文字"] * 10, vocab_size=280, show_progress=False)
    with pytest.raises(UserError, match="was prepared with tokenizer .* not this one"):
        ShardedTokens(folder, "valid", other)
    with pytest.raises(UserError, match="has no 'test' split; it has train, valid"):
        ShardedTokens(folder, "test")


def test_another_source_is_refused_unless_overwrite(corpus, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    first = prepare_shards(str(corpus), tokenizer, folder, shard_tokens=SHARD_TOKENS, progress=False)
    with monkeypatch.context() as patch:  # the same request again finds its shards and does no work
        patch.setattr(shards, "_encoded", lambda *args: pytest.fail("the prepared shards should have been reused"))
        assert prepare_shards(str(corpus), tokenizer, folder, shard_tokens=SHARD_TOKENS, progress=False) == first
    smaller = tmp_path / "smaller.txt"
    smaller.write_text("另一段文字。\n" * 50, encoding="utf-8")
    with pytest.raises(UserError, match=f"already holds shards of {corpus} .* pass --overwrite"):
        prepare_shards(str(smaller), tokenizer, folder, shard_tokens=SHARD_TOKENS, progress=False)
    with pytest.raises(UserError, match="already holds shards"):
        prepare_shards(str(corpus), tokenizer, folder, shard_tokens=SHARD_TOKENS * 2, progress=False)
    second = prepare_shards(str(smaller), tokenizer, folder, shard_tokens=SHARD_TOKENS, overwrite=True, progress=False)
    files = {shard["file"] for entry in second["splits"].values() for shard in entry["shards"]}
    assert {path.name for path in folder.glob("*.bin")} == files  # no stale shards of the first corpus
    assert second["source_sha256"] != first["source_sha256"] and len(ShardedTokens(folder, "train")) > 0
    with pytest.raises(UserError, match="not a prepared data folder"):
        prepare_shards(str(corpus), tokenizer, tmp_path, progress=False)  # holds smaller.txt
    with pytest.raises(UserError, match="unknown data source 'builtin:nope'"):
        prepare_shards("builtin:nope", tokenizer, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_split_tokens_reads_a_prepared_folder_or_the_cache(prepared, corpus, tokenizer, tmp_path):
    assert isinstance(split_tokens(str(prepared), "valid", tokenizer), ShardedTokens)
    from_cache = split_tokens(str(corpus), "valid", tokenizer, *SPLIT_FRACTIONS, root=tmp_path, progress=False)
    assert isinstance(from_cache, np.memmap) and np.array_equal(from_cache, ShardedTokens(prepared, "valid")[:])


def test_cli_prepares_and_errors_are_one_line(corpus, tokenizer, tmp_path, monkeypatch, capsys):
    tokenizer.save(tmp_path / "tok")
    arguments = ["data", "prepare", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok")]
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "out"), "--shard-tokens", "1000"])
    assert result.exit_code == 0, result.output
    index = read_index(tmp_path / "out")
    shard_count = sum(len(entry["shards"]) for entry in index["splits"].values())
    assert result.stdout.startswith(f"{shard_count} shards, {sum(e['tokens'] for e in index['splits'].values()):,}")
    assert " documents, " in result.output and " MB in " in result.stdout
    # `lmforge` itself (main), in this process: a user error is one line on stderr and exit code 2.
    monkeypatch.setattr(sys, "argv", ["lmforge", *arguments[:-1], str(tmp_path / "nothing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: no tokenizer folder {tmp_path / 'nothing'}: ") and error.count("\n") == 1


def test_several_sources_are_one_corpus_read_in_turn(corpus, tokenizer, tmp_path):
    lines = corpus.read_text(encoding="utf-8").split("\n")
    first, second, both = tmp_path / "first.txt", tmp_path / "second.txt", tmp_path / "both.txt"
    first.write_text("\n".join(lines[:150]), encoding="utf-8")
    second.write_text("\n".join(lines[150:]), encoding="utf-8")
    both.write_text("\n".join(lines), encoding="utf-8")
    options = {"splits": ("train", "valid"), "shard_tokens": SHARD_TOKENS, "valid_fraction": 0.1, "progress": False}
    index = prepare_shards([str(first), str(second)], tokenizer, tmp_path / "two", **options)
    reference = prepare_shards(str(both), tokenizer, tmp_path / "one", **options)
    assert index["source"] == f"{first} + {second}" and index["source_fingerprint"].count(" + ") == 1
    for split in ("train", "valid"):
        assert np.array_equal(ShardedTokens(tmp_path / "two", split, tokenizer)[:],
                              ShardedTokens(tmp_path / "one", split, tokenizer)[:])  # fmt: skip
    assert index["splits"]["train"]["documents"] == reference["splits"]["train"]["documents"] > 200
    # The CLI takes --data more than once, for `tokenizer train` and `data prepare` alike.
    arguments = ["--data", str(first), "--data", str(second), "--out"]
    result = CliRunner().invoke(app, ["tokenizer", "train", "--vocab-size", "300", *arguments, f"{tmp_path}/t"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["data", "prepare", "--tokenizer", f"{tmp_path}/t", *arguments, f"{tmp_path}/cli"])
    assert result.exit_code == 0, result.output
    assert read_index(tmp_path / "cli")["source"] == f"{first} + {second}"
