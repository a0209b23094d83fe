"""Sharded token data on disk: a corpus of any size, tokenized once into fixed-size memory-mapped shards.

`prepare_shards` streams a source record by record, encodes documents as
`<bos> text <eos>` (the token cache's layout) in worker processes, and writes
each split as one logical token stream cut into shards of exactly
`shard_tokens` ids (the last one shorter): `train_00000.bin`, `train_00001.bin`,
... Memory stays flat however large the corpus: a bounded number of record
batches is in flight, and each shard goes straight to disk. `index.json`,
written last, records what was read and what came out (token and document
counts, a SHA-256 per shard), and the tokenizer is saved beside it, so the
folder alone is enough to train from.

Reading a prepared folder back (`ShardedTokens`, `is_prepared`, `read_index`)
and the windows drawn from it are `data/tokens.py`'s: this module only writes.
It knows files of token ids, not models or training.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data.sources import SPLITS, read_records, record_text, source_fingerprint, split_key, split_of
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import ENCODE_BATCH, INDEX_FILE, SHARDS_FORMAT, encode_documents, token_dtype
from lmforge.errors import UserError
from lmforge.run_folder import RunFolder, read_json, write_json

# 100M tokens (200 MB as uint16) per shard, the size of the FineWeb shards modded-nanogpt trains from:
# few enough files for any file system, small enough to copy, checksum and cache one at a time.
DEFAULT_SHARD_TOKENS = 100_000_000
# The files a prepared folder may hold; anything else means --out is someone else's folder.
_OWN_FILE = re.compile(
    "|".join(map(re.escape, (INDEX_FILE, RunFolder.TOKENIZER, RunFolder.TOKENIZER_CONFIG)))
    + r"|(train|valid|test)_\d{5}\.bin|\..+\.tmp"
)
# What must match for a folder's shards to be the ones asked for.
_DESCRIPTION_KEYS = (
    "format", "source_fingerprint", "tokenizer", "dtype", "shard_tokens", "valid_fraction", "test_fraction"
)  # fmt: skip


def prepare_shards(
    source: str | Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    splits: Sequence[str] = ("train", "valid"),
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `source` into shards under `out_dir` and return the index written to `out_dir/index.json`.

    Several sources are one corpus, read one after another (People's Daily and a folder of other text, say);
    each record still goes to its split by its own key.

    The shards are the same whatever `workers` is. A folder that already holds
    these shards (same source, tokenizer and settings) is returned as it is; one
    that holds other shards is refused unless `overwrite`.
    """
    if not splits or any(split not in SPLITS for split in splits) or len(set(splits)) < len(splits):
        raise UserError(f"splits must be distinct names among {', '.join(SPLITS)}, not {list(splits)}")
    if shard_tokens < 1 or workers < 1:
        raise UserError(f"shard_tokens and workers must be >= 1, not {shard_tokens} and {workers}")
    if not (valid_fraction >= 0 and test_fraction >= 0 and valid_fraction + test_fraction <= 1):
        raise UserError(
            f"valid_fraction ({valid_fraction}) and test_fraction ({test_fraction}) must be >= 0 and sum to at most 1"
        )
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise UserError("prepare needs at least one data source")
    out_dir = Path(out_dir)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    description = {
        "format": SHARDS_FORMAT,
        "source": " + ".join(sources),
        # Raises for an unknown source, before any work.
        "source_fingerprint": " + ".join(source_fingerprint(one) for one in sources),
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "layout": "<bos> text <eos> per document",
        "shard_tokens": shard_tokens,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
    }
    existing = _claim_folder(out_dir, description, list(splits), overwrite)
    if existing is not None:
        return existing

    writers = {split: _ShardWriter(out_dir, split, shard_tokens, dtype) for split in splits}
    source_hash = hashlib.sha256()
    batches = _split_batches(sources, splits, valid_fraction, test_fraction, source_hash)
    bar = tqdm(desc=f"prepare {description['source']}", unit=" docs", unit_scale=True, disable=not progress)
    tokens = 0
    try:
        for split, documents, ids in _encoded(batches, tokenizer, dtype, workers):
            writers[split].write(ids, documents)
            tokens += len(ids)
            bar.update(documents)
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        split_entries = {split: writer.close() for split, writer in writers.items()}
    finally:
        bar.close()
        for writer in writers.values():
            writer.discard()
    tokenizer.save(out_dir)
    index = {**description, "source_sha256": source_hash.hexdigest(), "splits": split_entries}
    write_json(out_dir / INDEX_FILE, index)  # last: a folder with an index is a complete one
    return index


def _claim_folder(out_dir: Path, description: dict, splits: list[str], overwrite: bool) -> dict | None:
    """The folder's index if it already holds exactly these shards; otherwise make it ready for new ones."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    if index_path.is_file() and not overwrite:
        index = read_json(index_path)
        same = all(index.get(key) == description[key] for key in _DESCRIPTION_KEYS)
        if same and sorted(index.get("splits", {})) == sorted(splits):
            return index
        raise UserError(
            f"{out_dir} already holds shards of {index.get('source')} ({index.get('source_fingerprint')}, tokenizer "
            f"{index.get('tokenizer')}, splits {', '.join(index.get('splits', {}))}); pass --overwrite to replace "
            "them, or choose another --out"
        )
    foreign = sorted(path.name for path in out_dir.iterdir() if not _OWN_FILE.fullmatch(path.name))
    if foreign:
        raise UserError(
            f"--out {out_dir} is not empty and is not a prepared data folder (it holds {', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
        )
    # The index goes first: should this run die half-way, no index may vouch for a mix of old and new shards.
    index_path.unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if path.name.endswith(".bin") or path.name.endswith(".tmp"):
            path.unlink()
    return None


def _split_batches(
    sources: list[str], splits: Sequence[str], valid_fraction: float, test_fraction: float, source_hash
) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) batches in record order within each split, from one pass over the sources in turn.

    Every record's text, kept or not, goes into `source_hash` (length-prefixed, so texts cannot run together).
    """
    pending: dict[str, list[str]] = {split: [] for split in splits}
    records = ((source, number, record) for source in sources for number, record in enumerate(read_records(source), 1))
    for source, number, record in records:
        where = f"{source} record {number}"
        text = record_text(record, where=where)
        encoded = text.encode("utf-8")
        source_hash.update(len(encoded).to_bytes(8, "little") + encoded)
        split = split_of(split_key(record, where=where), valid_fraction, test_fraction)
        if split in pending:
            pending[split].append(text)
            if len(pending[split]) == ENCODE_BATCH:
                yield split, pending[split]
                pending[split] = []
    for split, texts in pending.items():
        if texts:
            yield split, texts


def _encoded(
    batches: Iterator[tuple[str, list[str]]], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[tuple[str, int, np.ndarray]]:
    """(split, documents, token ids) per batch, in the order the batches came, whatever `workers` is.

    With several workers at most 2 batches per worker are in flight, so memory does
    not grow with the corpus (an executor's `map` would read the whole source ahead).
    """
    if workers == 1:
        for split, texts in batches:
            yield split, len(texts), _encode_texts(texts, tokenizer, dtype)
        return
    in_flight: deque[tuple[str, int, Future]] = deque()
    executor = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(tokenizer,))
    try:
        for split, texts in batches:
            in_flight.append((split, len(texts), executor.submit(_encode_in_worker, texts, dtype)))
            if len(in_flight) >= 2 * workers:
                split, documents, future = in_flight.popleft()
                yield split, documents, future.result()
        while in_flight:
            split, documents, future = in_flight.popleft()
            yield split, documents, future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _encode_texts(texts: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    documents = list(encode_documents(texts, tokenizer))
    return np.fromiter(itertools.chain.from_iterable(documents), dtype, count=sum(map(len, documents)))


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:
    """Runs once in each worker process: keep the tokenizer (unpickled from its JSON) for every batch."""
    global _worker_tokenizer
    # The processes are the parallelism; a Rust thread pool in each would only fight them for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], dtype: np.dtype) -> np.ndarray:
    assert _worker_tokenizer is not None, "_start_worker has not run in this process"
    return _encode_texts(texts, _worker_tokenizer, dtype)


class _ShardWriter:
    """One split's token stream, cut into files of exactly `shard_tokens` ids, each fsynced and renamed when full."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict] = []  # the finished ones, as index entries
        self.documents = 0
        # The shard being written: its file (None between shards), name, running hash and token count.
        self.handle = None
        self.temp_path = self.folder / ".unused.tmp"
        self.name, self.hash, self.count = "", hashlib.sha256(), 0

    def write(self, ids: np.ndarray, documents: int) -> None:
        self.documents += documents
        while len(ids):
            if self.handle is None:
                self.name = f"{self.split}_{len(self.shards):05d}.bin"
                self.temp_path = self.folder / f".{self.name}.{os.getpid()}.tmp"
                self.handle = open(self.temp_path, "wb")  # noqa: SIM115 (open across calls; closed by _finish_shard)
                self.hash, self.count = hashlib.sha256(), 0
            piece, ids = ids[: self.shard_tokens - self.count], ids[self.shard_tokens - self.count :]
            data = piece.tobytes()
            self.handle.write(data)
            self.hash.update(data)
            self.count += len(piece)
            if self.count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict:
        """Finish the last shard; the split's entry for the index."""
        if self.handle is not None:
            self._finish_shard()
        return {
            "tokens": sum(shard["tokens"] for shard in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }

    def discard(self) -> None:
        """Remove a shard left half-written by an error (a no-op after `close`)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            self.temp_path.unlink(missing_ok=True)

    def _finish_shard(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        os.replace(self.temp_path, self.folder / self.name)
        self.shards.append({"file": self.name, "tokens": self.count, "sha256": self.hash.hexdigest()})
