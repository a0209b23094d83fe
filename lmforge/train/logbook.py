"""A run's training log: `metrics.jsonl`, and the same numbers as TensorBoard scalars.

`metrics.jsonl` is the record that plots, reports and `lmforge runs` read; the
event files in `run_dir/tensorboard/` are a view of it for `tensorboard --logdir
runs/`. Both are kept in step here, so a resumed run shows each step once in
either. This module knows log records (a dict with a `step`), not training:
what is logged and when is the trainer's business.
"""

from __future__ import annotations

import json
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from lmforge.run_folder import RunFolder, append_jsonl, atomic_write_text, read_jsonl

EVENT_FILE_GLOB = "events.out.tfevents.*"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one record: `valid_loss` -> `valid/loss`, `lr` -> `train/lr`."""
    tags = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = f"valid/{key.removeprefix('valid_')}" if key.startswith("valid_") else f"train/{key}"
        tags[tag] = float(value)
    return tags


class Logbook:
    """Append metric records to `metrics.jsonl` and TensorBoard; use one per `train()` call.

    resume_from_step: None for a fresh run (the old log and event files are removed), or the
    checkpoint's step on resume (records after it are dropped: that work is about to be redone).
    enabled: False on every rank but 0 of a distributed run; then nothing is read or written.
    """

    def __init__(
        self, run_dir: str | Path, resume_from_step: int | None, enabled: bool = True, flush_seconds: float = 10.0
    ) -> None:
        self.enabled = enabled
        self.metrics_path = RunFolder(run_dir).metrics_log
        self._writer = None
        self._closed = False
        if not enabled:
            return
        tensorboard_dir = RunFolder(run_dir).tensorboard
        old_event_files = sorted(tensorboard_dir.glob(EVENT_FILE_GLOB))
        kept: list[dict[str, Any]] = []
        if resume_from_step is None:
            self.metrics_path.unlink(missing_ok=True)
            for old in old_event_files:
                old.unlink()
        else:
            kept = [record for record in read_jsonl(self.metrics_path) if _step(record) <= resume_from_step]
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.metrics_path, "".join(_json_line(record) for record in kept))
        # The first step that will be logged again; TensorBoard hides older files' events from it on.
        purge_step = None if resume_from_step is None else resume_from_step + 1
        self._writer = _summary_writer(tensorboard_dir, purge_step, flush_seconds)
        if self._writer is None:
            return
        # A run that dies on an exception never reaches close(); the event queue is still written at exit.
        self._finalizer = weakref.finalize(self, self._writer.close)
        if not old_event_files:
            # Resuming a run whose first part had no TensorBoard: replay the kept records so both logs agree.
            for record in kept:
                self._add_scalars(record)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must have a `step`); its numeric fields become scalars at that step."""
        if not self.enabled:
            return
        if self._closed:
            raise ValueError(f"the logbook for {self.metrics_path.parent} is closed")
        append_jsonl(self.metrics_path, record)
        if self._writer is not None:
            self._add_scalars(record)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        wall_time = time.time()
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=record["step"], walltime=wall_time)

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._finalizer()  # closes the writer once, however often close() is called

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _summary_writer(log_dir: Path, purge_step: int | None, flush_seconds: float) -> Any:
    """A SummaryWriter, or None (with a one-line warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    # NOTE: flush_secs drives a background thread, so a run that stalls or is killed loses at most that much.
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=flush_seconds)
    writer.flush()  # the purge marker is on disk before any new step is
    return writer


def _step(record: dict[str, Any]) -> float:
    step = record.get("step")
    return step if isinstance(step, (int, float)) else float("inf")


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
