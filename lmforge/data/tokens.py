"""Token streams: documents -> token ids, token dtypes, and the windows every language-model caller reads.

A corpus split is encoded once into a flat array of token ids, documents written
as `<bos> text <eos>`, and cached on disk keyed by (source, split, tokenizer), so
a second run starts at once. A folder made by `lmforge data prepare`
(`data/shards.py`) holds the same stream cut into shards; `ShardedTokens` reads
one split of it lazily. `lm_windows` is the one way to get language-model
windows of a source, whichever of the two it is: pretraining, distillation,
pruning's recovery and perplexity all read their tokens through it.
Training batches are non-overlapping windows drawn in a seeded order per epoch:
the batch of step k depends only on (seed, k), which is what lets a resumed run
replay the same data. This module knows token ids and arrays, not models.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.cache_folder import cache_root
from lmforge.data.batches import shuffled_indices
from lmforge.data.sources import SPLITS, read_split, record_text, source_fingerprint, split_file, whole_file_fractions
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.run_folder import atomic_write_text, read_json

CACHE_FORMAT = 1
ENCODE_BATCH = 512


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


SHARDS_FORMAT = 1
INDEX_FILE = "index.json"  # a prepared folder's table of contents, written last by data/shards.py
# Shards kept mapped at once: random windows touch shards all over a large corpus, and each map holds a descriptor.
MAX_OPEN_SHARDS = 64


def is_prepared(source: str | Path) -> bool:
    """Whether `source` names a folder made by `prepare_shards` (rather than a data file or a built-in corpus)."""
    return (Path(source) / INDEX_FILE).is_file()


def read_index(folder: str | Path) -> dict:
    """A prepared folder's index, checked to be one this version reads."""
    index = read_json(Path(folder) / INDEX_FILE)
    if not isinstance(index, dict) or index.get("format") != SHARDS_FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise UserError(
            f"{folder}/{INDEX_FILE} has shard format {found!r}, this lmforge reads format {SHARDS_FORMAT}; "
            "prepare the data again with lmforge data prepare --overwrite"
        )
    return index


class ShardedTokens:
    """One split of a prepared folder as one read-only token sequence: `len`, `[i]` and `[start:stop]`.

    Shards are memory-mapped when first touched and never concatenated, so
    opening a split of any size costs a few file stats. Their sizes are checked
    on opening; their SHA-256s too with `verify=True` (this reads every byte).
    Give `tokenizer` to refuse shards made by a different one.
    """

    def __init__(
        self, folder: str | Path, split: str, tokenizer: Tokenizer | None = None, verify: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.split = split
        self.index = read_index(self.folder)
        if tokenizer is not None and tokenizer.fingerprint != self.index["tokenizer"]:
            raise UserError(
                f"{self.folder} was prepared with tokenizer {self.index['tokenizer']}, not this one "
                f"({tokenizer.fingerprint}); train with the tokenizer saved in {self.folder} or prepare the data again"
            )
        if split not in self.index["splits"]:
            raise UserError(f"{self.folder} has no '{split}' split; it has {', '.join(self.index['splits'])}")
        self.dtype = np.dtype(self.index["dtype"])
        self.shards = self.index["splits"][split]["shards"]
        # starts[k] is the position of shard k's first token in the split; starts[-1] is the split's length.
        self.starts = [0, *itertools.accumulate(shard["tokens"] for shard in self.shards)]
        for shard in self.shards:
            self._check(shard, verify)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def _check(self, shard: dict, verify: bool) -> None:
        path = self.folder / shard["file"]
        again = f"prepare the data again (lmforge data prepare --overwrite --out {self.folder})"
        if not path.is_file():
            raise UserError(f"shard {path} is missing; {again}")
        expected = shard["tokens"] * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise UserError(
                f"shard {path} has {path.stat().st_size:,} bytes, its index says {expected:,} "
                f"(truncated or overwritten); {again}"
            )
        if verify:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise UserError(f"shard {path} does not match its SHA-256 in {INDEX_FILE} (corrupted); {again}")

    def __getstate__(self) -> dict:
        # Another process (a DataLoader worker, a rank) maps the shards itself rather than receiving their bytes.
        return {**self.__dict__, "_maps": OrderedDict()}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens slices take no step")
            return self._range(start, max(start, stop))
        position = int(key) + len(self) if int(key) < 0 else int(key)
        if not 0 <= position < len(self):
            raise IndexError(f"token {key} is outside a split of {len(self)} tokens")
        return self._range(position, position + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            offset = self.starts[shard]
            end = min(stop, self.starts[shard + 1])
            pieces.append(self._map(shard)[start - offset : end - offset])
            start, shard = end, shard + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])  # a view of the map: no copy
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _map(self, shard: int) -> np.memmap:
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            self._maps[shard] = np.memmap(self.folder / self.shards[shard]["file"], dtype=self.dtype, mode="r")
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)  # views handed out keep their map alive
        return self._maps[shard]


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
    `lmforge data prepare` (its own split fractions hold), the whole SPLIT file of a folder of split files
    (train/valid/test.jsonl, as task data), else `token_cache`."""
    if is_prepared(source):
        return ShardedTokens(source, split, tokenizer)
    path = split_file(source, split) if split in SPLITS else None
    if path is not None:
        source, (valid_fraction, test_fraction) = str(path), whole_file_fractions(split)
    return token_cache(source, split, tokenizer, valid_fraction, test_fraction, root, progress)


def inputs_and_targets(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `context + 1` tokens -> (inputs, targets): all but the last token, all but the first."""
    stacked = torch.from_numpy(np.stack(windows).astype(np.int64))
    return stacked[:, :-1], stacked[:, 1:]  # (B, T), (B, T)


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
        return inputs_and_targets([self.window(int(i)) for i in indices])

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


class MixedWindows:
    """Training windows of a main corpus with `share` of every batch's rows drawn from a second one.

    Step s takes floor((s + 1) * B * share) - floor(s * B * share) rows from `mixed` and the rest from `main`, each
    corpus read in its own seeded order, every window once per epoch of that corpus: a pure function of the step,
    so resumed runs replay it, and the share is exact over any run of steps.
    """

    def __init__(self, main: LMWindows, mixed: LMWindows, share: float) -> None:
        if not 0 < share < 1:
            raise UserError(f"the mixed share must be between 0 and 1, not {share}")
        self.main, self.mixed, self.share = main, mixed, share
        self.tokens = main.tokens  # what the run's description counts; the mixed corpus is named beside it

    def __len__(self) -> int:
        return len(self.main)

    def _mixed_rows_before(self, step: int, batch_size: int) -> int:
        return int(step * batch_size * self.share)

    def training_batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.main) == 0 or len(self.mixed) == 0:
            raise ValueError(f"each corpus needs more than {self.main.context} tokens of training data")
        mixed_first = self._mixed_rows_before(step, batch_size)
        mixed_count = self._mixed_rows_before(step + 1, batch_size) - mixed_first
        main_first, main_count = step * batch_size - mixed_first, batch_size - mixed_count
        main = shuffled_indices(self.main.seed, len(self.main), main_first, main_count)
        mixed = shuffled_indices(self.mixed.seed, len(self.mixed), mixed_first, mixed_count)
        rows = [self.main.window(i) for i in main] + [self.mixed.window(i) for i in mixed]
        return inputs_and_targets(rows[rank::world_size])


def lm_windows(
    source: str,
    split: str,
    tokenizer: Tokenizer,
    context: int,
    seed: int = 0,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    root: Path | None = None,
    progress: bool = True,
) -> LMWindows:
    """Windows of `context` tokens over one split of `source`, a prepared folder or any source the cache reads.

    The one helper every language-model caller uses, so `lmforge data prepare` folders work everywhere.
    """
    tokens = split_tokens(source, split, tokenizer, valid_fraction, test_fraction, root, progress)
    return LMWindows(tokens, context, seed)
