"""`lmforge runs`: the run folders under a folder, with their step, best validation loss and status.

Reads what training leaves in a run folder (`metrics.jsonl`, `recipe.json`,
`task.json`, `checkpoints/step_N/`, `model.safetensors`, `report.md`) and never
writes. It knows file names and what they say about a run's state, not models
or training: no weights are ever loaded. A damaged or unreadable file shows as
"?" and the listing carries on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import UserError
from lmforge.run_folder import RunFolder

RUNNING_SECONDS = 120.0  # a run that wrote something this recently and has not finished counts as running
MAX_DEPTH = 3  # runs/demo/chat is depth 2 below runs/
NOT_RUNS = set(RunFolder.INNER_FOLDERS)  # folders inside a run that are never runs themselves
CHECKPOINT_NAME = re.compile(r"step_(\d+)")

Status = Literal["finished", "running", "stopped", "empty", "?"]


@dataclass
class RunSummary:
    name: str  # path relative to the listed folder ("." for the folder itself)
    kind: str | None  # "pretrain", a task from task.json, "chat LoRA", "summarize warm-up"; None if unknown
    status: Status
    step: int | None  # last step in metrics.jsonl
    max_steps: int | None  # recipe.json's train.max_steps
    best_valid_loss: float | None
    best_valid_step: int | None
    last_loss: float | None  # last training loss
    checkpoint_step: int | None  # newest complete checkpoint, where --resume would continue
    modified: float  # newest modification time in the folder, seconds since the epoch
    problems: list[str] = field(default_factory=list)  # what could not be read
    metrics_modified: float | None = field(default=None, repr=False)


def list_runs(root: str | Path, now: float | None = None) -> list[RunSummary]:
    """Every run folder (one with metrics.jsonl or config.json) under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no such folder: {root}")
    now = time.time() if now is None else now
    summaries: dict[Path, RunSummary] = {}
    for folder, entries, error in _candidate_folders(root, depth=0):
        name = "." if folder == root else folder.relative_to(root).as_posix()
        if error is not None:
            summaries[folder] = RunSummary(name, None, "?", None, None, None, None, None, None, 0.0, [error])
        else:
            summaries[folder] = summarize(folder, entries, name, now)
    for folder, summary in summaries.items():
        parent = summaries.get(folder.parent)
        if parent is not None and summary.kind is None and parent.kind is not None:
            summary.kind = f"{parent.kind} {folder.name}"
        # A phase (e.g. summarize's warm-up) has no model of its own: it is done once its parent run logs after it.
        if (
            summary.status == "stopped"
            and parent is not None
            and summary.metrics_modified is not None
            and (parent.metrics_modified or 0.0) > summary.metrics_modified
            and not RunFolder(folder).has_model()
        ):
            summary.status = "finished"
    return sorted(summaries.values(), key=lambda summary: summary.modified, reverse=True)


def summarize(folder: Path, entries: set[str], name: str, now: float) -> RunSummary:
    """What one run folder's files say about it; never raises for a damaged file."""
    problems: list[str] = []
    run = RunFolder(folder)
    records = _read_metrics(run.metrics_log, problems) if RunFolder.METRICS_LOG in entries else []
    readable = records is not None
    records = records or []
    steps = [record["step"] for record in records]
    valid = [(record["valid_loss"], record["step"]) for record in records if _is_number(record.get("valid_loss"))]
    losses = [record["loss"] for record in records if _is_number(record.get("loss"))]
    best_valid_loss, best_valid_step = min(valid, key=lambda pair: pair[0]) if valid else (None, None)

    recipe = _read_json(run.recipe, problems) if RunFolder.RECIPE in entries else {}
    train = recipe.get("train") if isinstance(recipe, dict) else None
    max_steps = train.get("max_steps") if isinstance(train, dict) else None
    max_steps = max_steps if isinstance(max_steps, int) and not isinstance(max_steps, bool) else None

    times = _modification_times(folder, entries)
    if RunFolder.MEMBERS in entries:
        # A soup's later members log in members/k/ (train/soup.py): the run is alive while they do.
        member_logs = folder.glob(f"{RunFolder.MEMBERS}/*/{RunFolder.METRICS_LOG}")
        logs = {log.relative_to(folder).as_posix() for log in member_logs}
        times |= _modification_times(folder, logs)  # a log gone meanwhile is skipped there
    metrics_time, model_time = times.get(RunFolder.METRICS_LOG), times.get(RunFolder.WEIGHTS)
    step = steps[-1] if steps else None
    finished = model_time is not None and (
        RunFolder.REPORT in entries
        or (max_steps is not None and step == max_steps)
        or metrics_time is None
        or model_time >= metrics_time  # the model was saved after the last line was logged
    )
    modified = max(times.values(), default=0.0)
    status: Status
    if not readable:
        status = "?"
    elif now - modified < RUNNING_SECONDS and not (model_time is not None and model_time >= (metrics_time or 0.0)):
        status = "running"  # a resumed run writes metrics.jsonl after its old model: running, not finished
    elif finished:
        status = "finished"
    elif not records:
        status = "empty"
    else:
        status = "stopped"
    return RunSummary(
        name=name,
        kind=_kind(folder, entries, problems),
        status=status,
        step=step,
        max_steps=max_steps,
        best_valid_loss=best_valid_loss,
        best_valid_step=best_valid_step,
        last_loss=losses[-1] if losses else None,
        checkpoint_step=_checkpoint_step(run.checkpoints) if RunFolder.CHECKPOINTS in entries else None,
        modified=modified,
        problems=problems,
        metrics_modified=metrics_time,
    )


def format_table(summaries: list[RunSummary], now: float | None = None) -> str:
    """Plain aligned columns, then a line per problem; the same in a terminal, a pipe or a log."""
    now = time.time() if now is None else now
    header = ["RUN", "KIND", "STEP", "BEST VALID LOSS", "LAST LOSS", "MODIFIED", "STATUS"]
    rows = [header]
    for summary in summaries:
        unreadable = summary.status == "?"
        step = _text(summary.step, unreadable)
        if summary.max_steps is not None and summary.step is not None:
            step = f"{summary.step}/{summary.max_steps}"
        best = _text(summary.best_valid_loss, unreadable)
        if summary.best_valid_loss is not None:
            best = f"{summary.best_valid_loss:.4f} @ {summary.best_valid_step}"
        rows.append(
            [
                summary.name,
                summary.kind or "?",
                step,
                best,
                _text(summary.last_loss, unreadable),
                _age(now - summary.modified) if summary.modified else "?",
                _status_text(summary),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"note: {summary.name}: {problem}" for summary in summaries for problem in summary.problems]
    return "\n".join(lines)


def as_json(summaries: list[RunSummary]) -> str:
    """One JSON line: a list of objects with RunSummary's fields."""
    fields = [name for name in RunSummary.__dataclass_fields__ if name != "metrics_modified"]
    return json.dumps([{name: getattr(summary, name) for name in fields} for summary in summaries], ensure_ascii=False)


def _candidate_folders(folder: Path, depth: int):
    """(folder, its entry names, error) for every run folder at most MAX_DEPTH below, and every unreadable one."""
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError as error:
        yield folder, set(), f"cannot read the folder: {error.strerror or error}"
        return
    names = {entry.name for entry in entries}
    if RunFolder.METRICS_LOG in names or RunFolder.CONFIG in names:
        yield folder, names, None
    if depth >= MAX_DEPTH:
        return
    for entry in sorted(entries, key=lambda entry: entry.name):
        try:
            # Symbolic links are not followed: a link back up would loop.
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_folder and entry.name not in NOT_RUNS and not entry.name.startswith("."):
            yield from _candidate_folders(Path(entry.path), depth + 1)


def _read_metrics(path: Path, problems: list[str]) -> list[dict[str, Any]] | None:
    """The well-formed records (a dict with an integer step) of metrics.jsonl; None if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        problems.append(f"cannot read {path.name}: {error.strerror or error}")
        return None
    records, corrupt = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            corrupt += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            records.append(record)
        else:
            corrupt += 1
    if corrupt:
        problems.append(f"{corrupt} unreadable line{'s' if corrupt > 1 else ''} in {path.name} skipped")
    return records


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"cannot read {path.name}: {getattr(error, 'strerror', None) or error}")
        return None


def _kind(folder: Path, entries: set[str], problems: list[str]) -> str | None:
    run = RunFolder(folder)
    lora = " LoRA" if RunFolder.ADAPTER_CONFIG in entries else ""
    if RunFolder.TASK in entries:
        task = _read_json(run.task, problems)
        if isinstance(task, dict) and isinstance(task.get("task"), str):
            return task["task"] + lora
        return None
    if RunFolder.RECIPE in entries or RunFolder.CONFIG in entries:
        # NOTE: every training job writes task.json and recipe.json before it trains; a folder with only
        # recipe.json or config.json is an older pretraining run (or a model imported from elsewhere).
        config = _read_json(run.config, problems) if RunFolder.CONFIG in entries else {}
        family = config.get("family") if isinstance(config, dict) else None
        return "pretrain" if family in (None, "decoder") else f"pretrain ({family})"
    return None


def _checkpoint_step(checkpoints: Path) -> int | None:
    """The newest checkpoint folder that was completed (trainer_state.json is written last)."""
    try:
        names = os.listdir(checkpoints)
    except OSError:
        return None
    complete = [
        int(match.group(1))
        for name in names
        if (match := CHECKPOINT_NAME.fullmatch(name)) and (checkpoints / name / RunFolder.TRAINER_STATE).is_file()
    ]
    return max(complete, default=None)


def _modification_times(folder: Path, entries: set[str]) -> dict[str, float]:
    times = {}
    for name in entries:
        try:
            times[name] = os.stat(folder / name, follow_symlinks=False).st_mtime_ns / 1e9
        except OSError:
            continue
    return times


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: int | float | None, unreadable: bool) -> str:
    if value is None:
        return "?" if unreadable else "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def _status_text(summary: RunSummary) -> str:
    if summary.status != "stopped":
        return summary.status
    if summary.checkpoint_step is None:
        return "stopped (no checkpoint)"
    return f"stopped (checkpoint at step {summary.checkpoint_step}: resume with --resume)"
