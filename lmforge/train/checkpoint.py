"""Resumable training state: weights, optimizer moments, RNG and step, as safetensors + JSON.

Each checkpoint is a folder `checkpoints/step_00001234/` built under a temporary
name and renamed into place when complete, so a run killed mid-write leaves the
previous checkpoint untouched. `trainer_state.json` is written last and carries
the SHA-256 of the tensor files; a checkpoint whose files do not match is
skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.run_folder import RunFolder, file_sha256, load_tensors, read_json, save_tensors, write_json

STATE_FILE = RunFolder.TRAINER_STATE


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict keyed by parameter name into tensors (safetensors) and the rest (JSON)."""
    tensors, scalars = {}, {}
    for parameter, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{parameter}.{name}"] = value
            else:
                scalars[f"{parameter}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            parameter, name = key.removeprefix("state.").rsplit(".", 1)  # parameter names hold dots themselves
            state.setdefault(parameter, {})[name] = value
    for key, value in saved["scalars"].items():
        parameter, name = key.rsplit(".", 1)
        state.setdefault(parameter, {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write full model and optimizer state (keyed by parameter name) as checkpoints/step_N; keep the last few."""
    checkpoints = RunFolder(run_dir).checkpoints
    final = checkpoints / f"step_{step:08d}"
    optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer_state)
    optimizer_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        optimizer_tensors["rng.cuda"] = torch.cuda.get_rng_state()

    def write(folder: Path) -> None:
        save_tensors(folder / RunFolder.WEIGHTS, model_state)
        save_tensors(folder / RunFolder.OPTIMIZER, optimizer_tensors)
        write_json(
            folder / STATE_FILE,
            {
                **trainer_state,
                "step": step,
                "optimizer": optimizer_rest,
                "sha256": {name: file_sha256(folder / name) for name in (RunFolder.WEIGHTS, RunFolder.OPTIMIZER)},
            },
        )

    try:
        _write_aside(final, write)
    except OSError as error:  # a full disk (ENOSPC), a quota or file-size limit (EFBIG), ...
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise UserError(
            f"could not write the checkpoint of step {step} to {checkpoints}: {error.strerror or error}; {kept}. "
            "Free some space, then continue with --resume"
        ) from None
    for old in sorted(checkpoints.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_aside(final: Path, write: Callable[[Path], None]) -> None:
    """Build folder `final` under a temporary name with `write(folder)`, then rename it into place.

    An OSError while writing (a full disk, ...) removes the temporary folder and propagates; `final` is untouched.
    A folder being replaced is renamed aside first and removed last: a kill between the two renames leaves it
    as `.old-NAME`, which `_settled` puts back.
    """
    temporary = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        write(temporary)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replaced = _replaced_name(final)
    if _settled(final).exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(temporary, final)
    _fsync_directory(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _replaced_name(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def _settled(final: Path) -> Path:
    """`final`, put back from its renamed-aside copy when a run was killed while replacing it."""
    replaced = _replaced_name(final)
    if not final.exists() and replaced.is_dir():
        os.replace(replaced, final)
    return final


def save_best(run_dir: Path, step: int, metric: str, value: float, model_state: dict[str, torch.Tensor]) -> None:
    """Keep the weights of the best validation result so far as best/ (written aside, then renamed into place)."""

    def write(folder: Path) -> None:
        save_tensors(folder / RunFolder.WEIGHTS, model_state)
        write_json(folder / STATE_FILE, {"step": step, "metric": metric, "value": value})

    try:
        _write_aside(RunFolder(run_dir).best, write)
    except OSError as error:
        raise UserError(
            f"could not keep the best weights (step {step}) in {RunFolder(run_dir).best}: {error.strerror or error}; "
            "the previous best and the checkpoints are intact. Free some space, then continue with --resume"
        ) from None


def read_best(run_dir: Path, metric: str) -> dict[str, Any] | None:
    """{"step", "metric", "value"} of the kept best weights for `metric`, or None when there are none."""
    path = _settled(RunFolder(run_dir).best) / STATE_FILE
    if not path.is_file():
        return None
    best = read_json(path)
    return best if best.get("metric") == metric else None


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(_settled(RunFolder(run_dir).best) / RunFolder.WEIGHTS)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_intact(folder: Path) -> bool:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        return all(file_sha256(folder / name) == digest for name, digest in state["sha256"].items())
    except (OSError, ValueError, KeyError):
        return False


def intact_checkpoints(run_dir: Path) -> Iterator[Path]:
    """The checkpoints whose files match their checksums, newest first; damaged ones are reported and skipped."""
    for folder in sorted((RunFolder(run_dir).checkpoints).glob("step_*"), reverse=True):
        if _is_intact(folder):
            yield folder
        else:
            warnings.warn(f"checkpoint {folder} is damaged or incomplete; falling back to an earlier one", stacklevel=3)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; damaged ones are reported and skipped."""
    return next(intact_checkpoints(run_dir), None)


def average_checkpoints(run_dir: Path, count: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The mean of the model weights of the last `count` intact checkpoints, and their steps (oldest first).

    Averaging the last checkpoints of a run (Vaswani et al. 2017, sec. 6.1) smooths the noise of the final
    steps; floating-point tensors are averaged in fp32 and cast back, others (counters) come from the newest.
    """
    folders = list(itertools.islice(intact_checkpoints(run_dir), max(count, 0)))[::-1]
    if not folders:
        raise UserError(f"no intact checkpoint to average in {run_dir}")
    averaged = mean_state(load_tensors(folder / RunFolder.WEIGHTS) for folder in folders)
    return averaged, [int(read_json(folder / STATE_FILE)["step"]) for folder in folders]


def mean_state(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of model states, read one at a time: floating-point tensors are averaged in fp32 and cast back,
    others (counters) come from the last state."""
    total: dict[str, torch.Tensor] = {}
    count, last = 0, {}
    for last in states:
        count += 1
        for name, tensor in last.items():
            if tensor.is_floating_point():
                total[name] = total[name] + tensor.float() if name in total else tensor.detach().float().clone()
    return {name: (total[name] / count).to(t.dtype) if t.is_floating_point() else t for name, t in last.items()}


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, trainer state) of a checkpoint, on the CPU; restores the RNG too."""
    state = read_json(folder / STATE_FILE)
    tensors = load_tensors(folder / RunFolder.OPTIMIZER)
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_state = tensors.pop("rng.cuda", None)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    return load_tensors(folder / RunFolder.WEIGHTS), _optimizer_state(tensors, state["optimizer"]), state
