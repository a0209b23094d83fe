"""Token data for training: a memory-mapped token cache and language-model windows over it.

A corpus split is encoded once into a flat array of token ids, documents written
as `<bos> text <eos>`, and cached on disk keyed by (source, split, tokenizer), so
a second run starts training at once. Training batches are non-overlapping
windows drawn in a seeded order per epoch: the batch of step k depends only on
(seed, k), which is what lets a resumed run replay the same data.
For corpora larger than memory, a folder made by `lmforge data prepare`
(`data/shards.py`) stands in for the cache; `split_tokens` picks one or the other.
This module knows token ids and arrays, not models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.sources import read_split, record_text, source_fingerprint
from lmforge.data.tokenizer import Tokenizer
from lmforge.run_folder import atomic_write_text

if TYPE_CHECKING:
    from lmforge.data.shards import ShardedTokens

CACHE_FORMAT = 1
ENCODE_BATCH = 512


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def token_cache(
    source: str,
    split: str,
    tokenizer: Tokenizer,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    root: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """All tokens of one split of `source` as a read-only memory-mapped array."""
    description = {
        "format": CACHE_FORMAT,
        "source": source_fingerprint(source),
        "split": split,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "tokenizer": tokenizer.fingerprint,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    folder = (root or cache_root()) / "tokens"
    data_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    dtype = token_dtype(tokenizer.vocab_size)
    if not (data_path.is_file() and meta_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        records = read_split(source, split, valid_fraction, test_fraction)
        temp_path = folder / f".{key}.{os.getpid()}.tmp"
        count, documents = 0, 0
        with open(temp_path, "wb") as handle:
            for ids in tqdm(
                _encoded_documents(records, tokenizer),
                desc=f"encode {split}",
                unit=" docs",
                disable=not progress,
                leave=False,
            ):
                handle.write(np.asarray(ids, dtype=dtype).tobytes())
                count, documents = count + len(ids), documents + 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, data_path)
        atomic_write_text(meta_path, json.dumps({**description, "tokens": count, "documents": documents}))
    if data_path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(data_path, dtype=dtype, mode="r")


def split_tokens(
    source: str,
    split: str,
    tokenizer: Tokenizer,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    root: Path | None = None,
    progress: bool = True,
) -> np.ndarray | ShardedTokens:
    """The tokens of one split, for `LMWindows`: lazily mapped shards when `source` is a folder made by
    `lmforge data prepare` (its own split fractions hold), else `token_cache`."""
    from lmforge.data.shards import ShardedTokens, is_prepared  # here: shards.py builds on this module

    if is_prepared(source):
        return ShardedTokens(source, split, tokenizer)
    return token_cache(source, split, tokenizer, valid_fraction, test_fraction, root, progress)


def _encoded_documents(records: Iterator[dict], tokenizer: Tokenizer) -> Iterator[list[int]]:
    batch: list[str] = []
    for record in records:
        batch.append(record_text(record))
        if len(batch) == ENCODE_BATCH:
            yield from encode_documents(batch, tokenizer)
            batch = []
    if batch:
        yield from encode_documents(batch, tokenizer)


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every id: half the disk and page cache of uint32 for most vocabularies."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_documents(texts: list[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Each text as one document, `<bos> text <eos>`: the layout of every token stream training reads."""
    for ids in tokenizer.encode_batch(texts):
        yield [tokenizer.bos_id, *ids, tokenizer.eos_id]


@lru_cache(maxsize=4)
def _epoch_order(seed: int, size: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def shuffled_indices(seed: int, size: int, first: int, count: int) -> list[int]:
    """The items of samples first .. first + count - 1 when every one of `size` items is drawn once per epoch,
    each epoch in its own seeded order: a pure function of its arguments, so resumed runs replay it exactly."""
    indices = []
    for sample in range(first, first + count):
        epoch, position = divmod(sample, size)
        indices.append(int(_epoch_order(seed, size, epoch)[position]))
    return indices


class LMWindows:
    """Non-overlapping windows of `context + 1` tokens: inputs are the first `context`, targets the last."""

    def __init__(self, tokens: np.ndarray | ShardedTokens, context: int, seed: int = 0) -> None:
        self.tokens = tokens
        self.context = context
        self.seed = seed
        self.num_windows = max(0, (len(tokens) - 1) // context)

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        start = index * self.context
        return self.tokens[start : start + self.context + 1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(np.stack([self.window(int(i)).astype(np.int64) for i in indices]))
        return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)

    def training_batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of step `step`: every window once per epoch, in a seeded order, a pure function of step.

        Under torchrun each process reads only its rows of the global batch: rank, rank + world_size, ...
        """
        if self.num_windows == 0:
            raise ValueError(f"the training data has fewer than {self.context + 1} tokens")
        indices = shuffled_indices(self.seed, self.num_windows, step * batch_size, batch_size)
        return self.batch(indices[rank::world_size])

    def evaluation_batches(
        self, batch_size: int, max_windows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows in order from the start, so every run evaluates on exactly the same tokens."""
        total = self.num_windows if max_windows is None else min(self.num_windows, max_windows)
        for start in range(0, total, batch_size):
            yield self.batch(range(start, min(start + batch_size, total)))


IGNORE_INDEX = -100


def pack_documents(documents: list[tuple[list[int], list[bool]]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack (ids, loss_mask) documents, in the given order, into rows of `length` tokens (first fit, no splitting).

    Returns input_ids, targets and segment_ids, each (rows, length). A target is
    the next token where that token carries loss and belongs to the same
    document, else IGNORE_INDEX; segment ids number the documents of a row from
    1 (0 = padding) so attention can be kept inside each one. Documents longer
    than `length` must be cut by the caller.
    """
    rows: list[list[int]] = []
    row_length = length
    for index, (ids, _) in enumerate(documents):
        if len(ids) > length:
            raise ValueError(f"document {index} has {len(ids)} tokens, more than the row length {length}")
        if row_length + len(ids) > length:
            rows.append([])
            row_length = 0
        rows[-1].append(index)
        row_length += len(ids)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((len(rows), length), dtype=np.int64)
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            ids, loss_mask = documents[index]
            end = start + len(ids)
            input_ids[row, start:end] = ids
            segment_ids[row, start:end] = segment
            # Position t predicts token t + 1: a target only where that next token carries loss.
            next_ids = np.asarray(ids[1:], dtype=np.int64)
            targets[row, start : end - 1] = np.where(np.asarray(loss_mask[1:], dtype=bool), next_ids, IGNORE_INDEX)
            start = end
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "segment_ids": torch.from_numpy(segment_ids),
    }
