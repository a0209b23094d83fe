"""What every task shares: its data split, checked fields, seeded training batches, and its report.

A task's data is either a folder with `train.jsonl`, `valid.jsonl` and
`test.jsonl` (the layout of `../shared/data/<task>`) or one source split by
hash like pretraining data. Every record is checked for the fields the task
needs, and a missing one is named together with the record it is missing from.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.cache_folder import cache_root
from lmforge.config import option
from lmforge.data.batches import shuffled_indices
from lmforge.data.sources import SPLITS, read_records, read_split
from lmforge.errors import UserError
from lmforge.evaluate.report import markdown_table
from lmforge.run_folder import RunFolder, atomic_write_text


@dataclass
class TaskData:
    source: str = option("builtin:reviews", "a folder with train/valid/test.jsonl, builtin:NAME or one data file")
    valid_fraction: float = option(0.05, "share held out for validation when one source is split by hash")
    test_fraction: float = option(0.05, "share held out for testing when one source is split by hash")
    max_train_examples: int = option(0, "use at most this many training examples (0 = all)")
    max_eval_examples: int = option(0, "evaluate on at most this many examples (0 = all)")


def split_file(source: str, split: str) -> Path | None:
    """`source/split.jsonl` when `source` is a folder of split files, else None."""
    folder = Path(source)
    return folder / f"{split}.jsonl" if folder.is_dir() else None


def describe_split(data: TaskData, split: str, key_field: str) -> str:
    """The exact split used, in words, for reports."""
    path = split_file(data.source, split)
    if path is not None:
        return f"{path} (all records)"
    return (
        f"{data.source}, records whose SHA-256 of `{key_field}` (of `split_key` where a record has one: the text a "
        f"built-in instruction was made from) falls in the {split} split "
        f"(valid {data.valid_fraction:.0%}, test {data.test_fraction:.0%})"
    )


def task_records(data: TaskData, split: str, fields: Sequence[str], key_field: str | None = None) -> list[dict]:
    """The records of one split, each checked to carry `fields`; hash splits are keyed by `key_field`."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    path = split_file(data.source, split)
    if path is not None:
        if not path.is_file():
            raise UserError(f"{data.source} is a folder but has no {split}.jsonl")
        records, where = read_records(str(path)), str(path)
    else:
        key = key_field or fields[0]
        records = read_split(data.source, split, data.valid_fraction, data.test_fraction, text_field=key)
        where = f"{data.source} ({split} split)"
    limit = data.max_train_examples if split == "train" else data.max_eval_examples
    checked = []
    for number, record in enumerate(records, start=1):
        for name in fields:
            if record.get(name) is None or record.get(name) == "":
                problem = "is missing" if name not in record else "is empty"
                raise UserError(f"field '{name}' {problem} in record {number} of {where}; it has {sorted(record)}")
        checked.append(record)
    if not checked:
        raise UserError(f"the {split} split of {data.source} has no records")
    if limit and len(checked) > limit:
        # A seeded sample in file order rather than the first N: files are often sorted (all positives first).
        keep = np.sort(np.random.default_rng(0).permutation(len(checked))[:limit])
        checked = [checked[index] for index in keep]
    return checked


class ExampleBatches:
    """Batches of examples for the trainer: every example once per epoch, in a seeded order.

    `batch(index)` is a pure function of the micro-batch index, so a resumed run
    sees the batches an uninterrupted run would have seen; `collate` gets a
    generator seeded by the index for any randomness of its own (e.g. masking).
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        collate: Callable[[list, np.random.Generator], Any],
        seed: int = 0,
    ) -> None:
        if not examples:
            raise UserError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed

    def batch(self, index: int) -> Any:
        positions = shuffled_indices(self.seed, len(self.examples), index * self.batch_size, self.batch_size)
        picked = [self.examples[position] for position in positions]
        return self.collate(picked, np.random.default_rng([self.seed, index, 1]))


def in_batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


BASELINE_CACHE_FORMAT = 1


def fingerprint(value: Any) -> str:
    """SHA-256 of a JSON value (records, texts): what a cached result was computed from."""
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def baseline_cache_folder() -> Path:
    return cache_root() / "baselines"


def cached_baseline(description: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(compute()'s JSON value, whether it came from the cache), cached under `description` in the shared cache.

    Baselines that cost more than the model (a pure-Python classifier retrained on a large split) are computed
    once per input: `description` names the baseline and fingerprints of everything its result depends on.
    """
    description = {"format": BASELINE_CACHE_FORMAT, **description}
    key = fingerprint(description)[:24]
    path = baseline_cache_folder() / f"{key}.json"
    if path.is_file():
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("description") == description:
                return entry["value"], True
        except (ValueError, KeyError, AttributeError):
            pass  # a damaged entry is computed again and replaced
    value = compute()
    try:
        atomic_write_text(path, json.dumps({"description": description, "value": value}, ensure_ascii=False))
    except OSError as error:  # a read-only or full cache folder costs the next run time, not this run its report
        warnings.warn(f"could not cache a baseline in {path.parent}: {error}", stacklevel=2)
    return value, False


def report_folders(model_dir: str | Path, out_dir: str | Path | None) -> tuple[Path, Path]:
    """(model folder, report folder): the report goes to `out_dir`, or next to the model, created if needed."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return model_dir, out_dir


def write_task_report(
    folder: str | Path,
    title: str,
    metrics: dict[str, Any],
    rows: Sequence[tuple[str, dict[str, float]]],
    columns: Sequence[tuple[str, str]],
    examples: Sequence[dict[str, str]],
    data_split: str,
    notes: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> None:
    """`report.md` (metric table with baselines, examples, the split) and `metrics.json` in `folder`.

    rows: (system name, its metrics); columns: (metric key, column title); sections: markdown after the examples.
    """
    folder = RunFolder(folder)
    setup = folder.training_setup()  # how the run trained, when `folder` is the run folder itself
    folder.write_metrics({**metrics, **setup, "data_split": data_split})
    table = markdown_table(
        ["system", *(heading for _, heading in columns)],
        [[name, *(values.get(key, "") for key, _ in columns)] for name, values in rows],
    )
    example_table = markdown_table(list(examples[0]), [list(e.values()) for e in examples]) if examples else ""
    trained = [f"Trained in {setup['precision']} with {setup['optimizer']}.", ""] if setup else []
    parts = [f"# {title}", "", table, "", *notes, "", *trained, f"Data: {data_split}", "", "## Examples", "",
             example_table, "", *sections]  # fmt: skip
    folder.write_report("\n".join(parts))
