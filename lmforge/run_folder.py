"""The run folder: the unit every lmforge command passes around.

A run folder holds `config.json` (the model config), `model.safetensors`, the
tokenizer files, `generation_config.json`, `metrics.jsonl`, `loss.png`,
`report.md`, and `checkpoints/` while a run is resumable. Everything here is
safetensors or JSON, and every write goes to a temporary file that is fsynced
and then renamed, so a killed process never leaves a half-written file behind.
This module knows file formats and atomicity, not what a model is.
"""

from __future__ import annotations

import json
import os
import tempfile
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
