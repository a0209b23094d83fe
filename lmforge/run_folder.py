"""The run folder: the unit every lmforge command passes around, and the only place its file names are spelt.

A run folder holds `config.json` (the model config), `model.safetensors`, the
tokenizer files, `generation_config.json`, `task.json`, `recipe.json`,
`metrics.jsonl`, `metrics.json`, `loss.png`, `report.md`, `tensorboard/`, and
`checkpoints/` (plus `best/`) while a run is resumable; a LoRA run holds
`adapter_config.json` + `adapter_model.safetensors` instead of full weights.
`checksums.json` records the SHA-256 of each weights file written here; reads
verify it (set LMFORGE_SKIP_CHECKSUMS=1, or pass verify=False, to skip hashing a
huge folder), and a folder without it (older runs, imported Hugging Face folders)
still loads.
`RunFolder` names each of them; everything else asks it instead of joining
strings. Everything here is safetensors or JSON, and every write goes to a
temporary file that is fsynced and then renamed, so a killed process never
leaves a half-written file behind. This module knows file names, formats and
atomicity, not what a model is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from lmforge.errors import UserError

# The process's umask, read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions an ordinary open() would.
        os.chmod(temp_name, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # Tied weights share storage; safetensors refuses shared tensors, so save private copies.
    owned = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    atomic_write_bytes(path, save(owned, metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing weights file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read {path}: {error}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):  # 16 MiB at a time: memory stays flat for any file size
            digest.update(chunk)
    return digest.hexdigest()


def checksums_skipped() -> bool:
    """LMFORGE_SKIP_CHECKSUMS=1: load without hashing the weights (huge folders on trusted disks)."""
    return os.environ.get("LMFORGE_SKIP_CHECKSUMS", "").strip().lower() in ("1", "true", "yes")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a crash can lose at most this line, never earlier ones."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return records


def refuse_pickle_weights(folder: Path, saved_with: str) -> None:
    """A UserError for a folder whose weights are only pickles (pytorch_model.bin), saying how to convert them.

    Loading a pickle can run arbitrary code, so lmforge never does; `saved_with` names the transformers
    class the user loads the folder with to convert it (e.g. "AutoModelForCausalLM").
    """
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise UserError(
            f"{folder} has only pytorch_model.bin; lmforge reads safetensors only, because loading a pickle can run "
            "arbitrary code (CVE-2025-32434). Convert it in a trusted environment with transformers: load it with the "
            f"class it was saved from (e.g. {saved_with}.from_pretrained(folder)), call save_pretrained(new_folder, "
            "safe_serialization=True), copy the tokenizer files over, and use new_folder"
        )


@dataclass(frozen=True)
class RunFolder:
    """One run folder: the path of every file lmforge reads or writes in it, and typed reads and writes.

    A Hugging Face model folder shares the names that both formats use (config.json, model.safetensors,
    tokenizer files, generation_config.json), so importers and exporters use this type too.
    """

    path: Path

    CONFIG = "config.json"
    WEIGHTS = "model.safetensors"
    WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded Hugging Face weights
    TOKENIZER = "tokenizer.json"
    TOKENIZER_CONFIG = "tokenizer_config.json"
    GENERATION = "generation_config.json"
    TASK = "task.json"
    RECIPE = "recipe.json"
    METRICS_LOG = "metrics.jsonl"
    METRICS = "metrics.json"
    LOSS_PLOT = "loss.png"
    REPORT = "report.md"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    BEST = "best"
    WARM_UP = "warm-up"  # a task's first training phase (tasks/base.py: Setup.first_phase)
    MEMBERS = "members"  # members/1, members/2, ...: a model soup's other members (train/soup.py)
    MEMBERS_START = "start.safetensors"  # in members/: the weights every member of a soup starts from
    TRAINER_STATE = "trainer_state.json"
    OPTIMIZER = "optimizer.safetensors"
    ADAPTER_CONFIG = "adapter_config.json"
    ADAPTER_WEIGHTS = "adapter_model.safetensors"
    CHECKSUMS = "checksums.json"  # {weights file name: SHA-256 hex}, written with the weights, verified on read
    PRUNE_SUMMARY = "prune.json"  # what `lmforge prune` did: source, sparsity, recovery losses
    # The files a model needs besides its weights and config: copied by quantize, prune and ONNX export.
    COMPANIONS = (TOKENIZER, TOKENIZER_CONFIG, GENERATION)
    # Folders inside a run that are never runs themselves.
    INNER_FOLDERS = (CHECKPOINTS, TENSORBOARD, BEST, MEMBERS)

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # Paths, one per file.
    config = property(lambda self: self.path / self.CONFIG)
    weights = property(lambda self: self.path / self.WEIGHTS)
    weights_index = property(lambda self: self.path / self.WEIGHTS_INDEX)
    tokenizer = property(lambda self: self.path / self.TOKENIZER)
    tokenizer_config = property(lambda self: self.path / self.TOKENIZER_CONFIG)
    generation = property(lambda self: self.path / self.GENERATION)
    task = property(lambda self: self.path / self.TASK)
    recipe = property(lambda self: self.path / self.RECIPE)
    metrics_log = property(lambda self: self.path / self.METRICS_LOG)
    metrics = property(lambda self: self.path / self.METRICS)
    loss_plot = property(lambda self: self.path / self.LOSS_PLOT)
    report = property(lambda self: self.path / self.REPORT)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    best = property(lambda self: self.path / self.BEST)
    adapter_config = property(lambda self: self.path / self.ADAPTER_CONFIG)
    adapter_weights = property(lambda self: self.path / self.ADAPTER_WEIGHTS)
    prune_summary = property(lambda self: self.path / self.PRUNE_SUMMARY)
    checksums = property(lambda self: self.path / self.CHECKSUMS)

    # What the folder holds.
    def has_model(self) -> bool:
        """A model config is here (lmforge's or Hugging Face's)."""
        return self.config.is_file()

    def has_weights(self) -> bool:
        return self.weights.is_file() or self.weights_index.is_file()

    def has_adapter(self) -> bool:
        return self.adapter_config.is_file()

    def has_tokenizer(self) -> bool:
        return self.tokenizer.is_file()

    # Reads and writes of the JSON files (atomic writes; a missing or malformed file is a UserError).
    def read_config(self) -> dict[str, Any]:
        return read_json(self.config)

    def write_config(self, values: dict[str, Any]) -> None:
        write_json(self.config, values)

    def read_task(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """task.json: what the model was trained to do; `default` when the folder has none (a pretrained model)."""
        if default is not None and not self.task.is_file():
            return default
        return read_json(self.task)

    def write_task(self, values: dict[str, Any]) -> None:
        write_json(self.task, values)

    def read_recipe(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        if default is not None and not self.recipe.is_file():
            return default
        return read_json(self.recipe)

    def write_recipe(self, values: dict[str, Any]) -> None:
        write_json(self.recipe, values)

    def read_metrics_log(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (none if the file is missing; a torn last line is skipped)."""
        return read_jsonl(self.metrics_log)

    def training_setup(self) -> dict[str, str]:
        """{"precision", "optimizer"} as the trainer logged them at the start of the run's last part; {} if none."""
        for record in reversed(self.read_metrics_log()):
            if "precision" in record:
                return {key: record[key] for key in ("precision", "optimizer") if key in record}
        return {}

    def write_metrics(self, values: dict[str, Any]) -> None:
        write_json(self.metrics, values)

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics)

    def write_report(self, text: str) -> None:
        atomic_write_text(self.report, text)

    def read_weights(self, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        """model.safetensors, its SHA-256 checked against checksums.json when recorded (see `verify_checksum`)."""
        if verify:
            self.verify_checksum(self.WEIGHTS)
        return load_tensors(self.weights, device)

    def write_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self._write_checksummed(self.WEIGHTS, tensors)

    def read_adapter_weights(self, verify: bool = True) -> dict[str, torch.Tensor]:
        if verify:
            self.verify_checksum(self.ADAPTER_WEIGHTS)
        return load_tensors(self.adapter_weights)

    def write_adapter_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self._write_checksummed(self.ADAPTER_WEIGHTS, tensors)

    def _write_checksummed(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        # The old entry goes first: a process killed between the two writes leaves weights with no recorded
        # checksum (which load), never new weights beside an old checksum (which would read as damage).
        self._record_checksum(name, None)
        save_tensors(self.path / name, tensors, metadata={"format": "pt"})
        self._record_checksum(name, file_sha256(self.path / name))

    def read_checksums(self) -> dict[str, str]:
        return read_json(self.checksums) if self.checksums.is_file() else {}

    def _record_checksum(self, name: str, digest: str | None) -> None:
        recorded = self.read_checksums()
        if digest is None and name not in recorded:
            return
        recorded.pop(name, None)
        write_json(self.checksums, recorded if digest is None else {**recorded, name: digest})

    def verify_checksum(self, name: str) -> None:
        """A UserError if `name`'s SHA-256 differs from the one recorded when it was written.

        Nothing to check when none was recorded (runs saved before checksums existed, Hugging Face
        folders) or when LMFORGE_SKIP_CHECKSUMS=1.
        """
        expected = self.read_checksums().get(name)
        path = self.path / name
        if expected is None or checksums_skipped() or not path.is_file():
            return
        actual = file_sha256(path)
        if actual != expected:
            raise UserError(
                f"{path} is damaged: its SHA-256 is {actual[:16]}..., not the {expected[:16]}... recorded in "
                f"{self.checksums} when it was saved; restore it from a backup or a checkpoint "
                "(LMFORGE_SKIP_CHECKSUMS=1 loads it anyway)"
            )

    def copy_companions(self, source: str | Path) -> None:
        """Copy the COMPANIONS that `source` has (tokenizer, generation settings) into this folder, atomically."""
        for name in self.COMPANIONS:
            if (Path(source) / name).is_file():
                atomic_write_bytes(self.path / name, (Path(source) / name).read_bytes())
