"""Quantizing a run: every linear layer of a float model to int8 or int4 (models/quantized.py), or a bf16 cast.

`quantize_model` swaps each `nn.Linear` for an `Int8Linear` or `Int4Linear`; `quantize_run` does it to a
run folder and writes a new one whose config.json gains a `quantization` entry (method, group size, the
modules replaced), which `models.load_model` reads back. The formats and kernels are described in
models/quantized.py. This module knows run folders and which layers to quantize, not tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lmforge.compress import check_folders
from lmforge.errors import UserError
from lmforge.models import load_model, model_config, model_state
from lmforge.models.quantized import (
    METHODS,
    Int4Linear,
    Int8Linear,
    quantized_layers,
    tied_embeddings,
)
from lmforge.run_folder import RunFolder


def _targets(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear but those named in `exclude` (a full dotted name or its last part, e.g. `lm_head`)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in exclude and name.rpartition(".")[2] not in exclude
    }


def quantize_model(model: nn.Module, method: str, group_size: int = 32, exclude: Sequence[str] = ()) -> dict:
    """In place: quantize the linear layers of `model` (or cast it, for bf16); return the config.json entry.

    A tied output layer is quantized too, and its embedding set to the dequantized values, so this model
    computes exactly what the saved and reloaded one will.
    """
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r}; known: {', '.join(METHODS)}")
    if quantized_layers(model):
        raise UserError("the model is already quantized; quantize its float run folder instead")
    if method == "bf16":
        model.to(torch.bfloat16)
        return {"method": method, "group_size": None, "modules": []}
    targets = _targets(model, exclude)
    if not targets:
        raise UserError(f"no linear layer left to quantize (exclude: {', '.join(exclude)})")
    if method == "int4":
        uneven = [f"{name} ({linear.in_features} inputs)" for name, linear in targets.items()
                  if group_size < 2 or group_size % 2 or linear.in_features % group_size]  # fmt: skip
        if uneven:
            raise UserError(
                f"int4 group size {group_size} must be even and divide every layer's inputs; it does not for "
                f"{', '.join(uneven[:3])}: pick another --group-size or --exclude those layers"
            )
    embeddings = tied_embeddings(model, list(targets))
    with torch.no_grad():
        for name, linear in targets.items():
            if method == "int4":
                layer = Int4Linear.from_linear(linear, group_size)
            else:
                layer = Int8Linear.from_linear(linear, dynamic_activations=method == "int8-dynamic")
            model.set_submodule(name, layer)
        for name, source in embeddings.items():
            model.get_parameter(source).copy_(model.get_submodule(name).dequantize())
    return {"method": method, "group_size": group_size if method == "int4" else None, "modules": list(targets)}


def save_quantized(folder: str | Path, model: nn.Module, entry: dict) -> None:
    """The config (with the `quantization` entry) and the weights; tied embeddings stored once, quantized."""
    run = RunFolder(folder)
    state = model_state(model)
    for source in tied_embeddings(model, entry["modules"]).values():
        state.pop(source, None)
    run.write_weights(state)
    run.write_config({**model_config(model), "quantization": entry})


def folder_bytes(folder: str | Path) -> int:
    """Size of the weights on disk."""
    return RunFolder(folder).weights.stat().st_size


def quantize_run(
    model_dir: str | Path, out: str | Path, method: str, group_size: int = 32, exclude: Sequence[str] = ()
) -> dict:
    """Quantize run folder `model_dir` into a new run folder `out` (tokenizer and generation config copied).

    Returns {"method", "group_size", "modules" (count), "bytes_before", "bytes_after"}.
    """
    check_folders(model_dir, out, "is already quantized; quantize its float run folder instead")
    model = load_model(model_dir, "cpu")
    entry = quantize_model(model, method, group_size, exclude)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_quantized(out, model, entry)
    RunFolder(out).copy_companions(model_dir)
    return {
        "method": method,
        "group_size": entry["group_size"],
        "modules": len(entry["modules"]),
        "bytes_before": folder_bytes(model_dir),
        "bytes_after": folder_bytes(out),
    }
