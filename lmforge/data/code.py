"""Python source as training data: the interpreter's standard library or a folder of `.py` files, split by file,
cut into chunks, and rearranged for fill-in-the-middle training.

`python_files` reads a corpus (`stdlib` is the standard library of the Python running lmforge, found through
`sysconfig`: PSF licence, on every machine, no download) and counts what it skipped: empty files and files that
are not UTF-8 text are left out; files that do not parse as Python are kept (they are still code) and counted.
A file belongs to one split by a hash of its path inside the corpus, so lines of one file never leak between
training and evaluation.

Fill-in-the-middle follows Bavarian et al. (https://arxiv.org/abs/2207.14255) as StarCoder trains it: a document
is cut at two random character positions into prefix / middle / suffix and rearranged as PSM
(`<fim_prefix> P <fim_suffix> S <fim_middle> M`) or SPM (`<fim_prefix> <fim_suffix> S <fim_middle> P M`). A share
of the middles can be whole lines instead (`fim_span`), the kind of middle that filling in one line asks for.

Knows text and token ids; does not know models or metrics.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.sources import split_of
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

STDLIB = "stdlib"
# Folders of the standard library that are not library code: tests (a third of it, with files that are invalid on
# purpose), third-party packages, caches.
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass
class CodeFile:
    path: str  # inside the corpus, with "/" separators: the split key
    text: str
    parses: bool


@dataclass
class CodeCorpus:
    files: list[CodeFile]
    counts: Counter = field(default_factory=Counter)  # files read, empty, binary, invalid_python

    def split(self, name: str, valid_fraction: float, test_fraction: float) -> list[CodeFile]:
        return [file for file in self.files if split_of(file.path, valid_fraction, test_fraction) == name]


def corpus_root(source: str) -> Path:
    """The folder (or single file) a code source names; `stdlib` is this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"]) if source == STDLIB else Path(source)
    if not root.exists():
        raise UserError(f"code source {source} does not exist (give a folder of .py files, a .py file or {STDLIB})")
    return root


def python_files(source: str, max_files: int = 0) -> CodeCorpus:
    """The `.py` files of `source` in path order (at most `max_files` when > 0), with counts of what was skipped."""
    root = corpus_root(source)
    paths = [root] if root.is_file() else sorted(_walk(root))
    if not paths:
        raise UserError(f"{source} holds no .py files")
    corpus = CodeCorpus([])
    for path in paths:
        if max_files and len(corpus.files) >= max_files:
            break
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        corpus.counts["files_seen"] += 1
        problem, text = _read_code(path)
        if problem:
            corpus.counts[problem] += 1
            continue
        valid = parses(text)
        corpus.counts["valid_python" if valid else "invalid_python"] += 1
        corpus.files.append(CodeFile(relative, text, valid))
    if not corpus.files:
        raise UserError(f"{source} has no usable .py file: {_describe_counts(corpus.counts)}")
    return corpus


def _walk(root: Path):
    for folder, folders, names in os.walk(root):
        folders[:] = [name for name in folders if name not in SKIPPED_FOLDERS]
        yield from (Path(folder) / name for name in names if name.endswith(".py"))


def _read_code(path: Path) -> tuple[str | None, str]:
    """(None, text), or (why it is skipped: "empty" or "binary", "")."""
    data = path.read_bytes()
    if not data.strip():
        return "empty", ""
    if b"\0" in data:
        return "binary", ""
    try:
        return None, data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", ""


def parses(text: str) -> bool:
    """Whether `text` is valid Python (the `ast` module parses it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files are warnings, not errors
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            return False
    return True


def _describe_counts(counts: Counter) -> str:
    return ", ".join(f"{counts[name]} {name.replace('_', ' ')}" for name in ("files_seen", "empty", "binary"))


def line_chunks(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[str]:
    """`text` cut at line ends into pieces of at most `max_tokens` tokens each (a longer single line is cut too)."""
    lines = text.splitlines(keepends=True)
    counts = [len(ids) for ids in tokenizer.encode_batch(lines)] if lines else []
    chunks, current, size = [], [], 0
    for line, count in zip(lines, counts):
        if size + count > max_tokens and current:
            chunks.append("".join(current))
            current, size = [], 0
        if count > max_tokens:  # one over-long line (a data table): cut by tokens
            ids = tokenizer.encode(line)
            chunks += [tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)]
            continue
        current.append(line)
        size += count
    if current:
        chunks.append("".join(current))
    return chunks


def fim_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    if tokenizer.fim_ids is None:
        raise UserError("this tokenizer has no fill-in-the-middle tokens: the model was not trained with FIM")
    return tokenizer.fim_ids


def fim_prompt_ids(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt that asks a FIM-trained model for the middle between `prefix` and `suffix`."""
    prefix_id, suffix_id, middle_id = fim_ids(tokenizer)
    return [tokenizer.bos_id, prefix_id, *tokenizer.encode(prefix), suffix_id, *tokenizer.encode(suffix), middle_id]


MAX_MIDDLE_LINES = 3


def fim_span(text: str, rng: np.random.Generator, line_rate: float) -> tuple[int, int]:
    """(start, end) of a FIM middle: two random characters, or with probability `line_rate` one to MAX_MIDDLE_LINES
    whole lines without their last newline, the middle that filling in a line (what the evaluation hides) needs.
    Random characters make middles a third of a chunk long on average, rarely one line."""
    lines = text.splitlines(keepends=True)
    if lines and rng.random() < line_rate:
        first = int(rng.integers(len(lines)))
        count = int(rng.integers(1, MAX_MIDDLE_LINES + 1))
        start = sum(map(len, lines[:first]))
        middle = "".join(lines[first : first + count])
        return start, start + len(middle.rstrip("\r\n"))
    start, end = np.sort(rng.integers(0, len(text) + 1, size=2))
    return int(start), int(end)


def training_ids(
    tokenizer: Tokenizer, text: str, rng: np.random.Generator, fim_rate: float, spm_rate: float, line_rate: float = 0.0
):
    """One training document: `<bos> text <eos>` left to right, or with probability `fim_rate` a FIM rearrangement
    (SPM with probability `spm_rate`, else PSM) whose middle ends with `<eos>`, so a completion knows where to stop.
    The middle is cut at two random characters, or with probability `line_rate` is whole lines (`fim_span`)."""
    if fim_rate <= 0 or rng.random() >= fim_rate:
        return tokenizer.encode(text, add_bos=True, add_eos=True)
    prefix_id, suffix_id, middle_id = fim_ids(tokenizer)
    start, end = fim_span(text, rng, line_rate)
    prefix, middle, suffix = (tokenizer.encode(part) for part in (text[:start], text[start:end], text[end:]))
    if rng.random() < spm_rate:
        ids = [prefix_id, suffix_id, *suffix, middle_id, *prefix, *middle]
    else:
        ids = [prefix_id, *prefix, suffix_id, *suffix, middle_id, *middle]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]
