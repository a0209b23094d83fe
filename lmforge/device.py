"""Where tensors live and in what precision: CUDA, then Apple MPS, then CPU, unless the user says.

On CPUs without AMX, fp32 matmuls beat bf16, so fp32 is the CPU default and
bf16 autocast the GPU default. `evaluating(model)` is the one way code outside
the training loop switches a model to eval mode and back.
"""

from __future__ import annotations

import contextlib

import torch

from lmforge.errors import UserError


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise UserError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {requested} asked for, but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("device mps asked for, but Apple MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """precision "auto" | "fp32" | "bf16" -> the autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise UserError(f"unknown precision {precision!r}; use auto, fp32 or bf16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Put `model` in eval mode with gradients off for the block, then back in the mode it was in.

    Evaluation during training must leave a training model training (dropout on), and a model that
    was already in eval mode must stay there: one helper instead of a save-and-restore at every caller.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
