"""Where tensors live and in what precision: CUDA, then Apple MPS, then CPU, unless the user says.

Precision "auto" is bf16 autocast on CUDA (with bf16 support) and, on a CPU,
whichever of bf16 and fp32 multiplies matrices faster on this machine: a CPU
with AMX or AVX-512 bf16 runs bf16 matmuls about twice as fast as fp32, one with
only AVX2 about a hundred times slower. A short probe (well under a second)
measures both once per machine and caches the result in the cache root, keyed
by the CPU's model name, its instruction-set flags and the torch version.
`evaluating(model)` is the one way code outside the training loop switches a
model to eval mode and back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.cache_folder import cache_root
from lmforge.errors import UserError
from lmforge.run_folder import read_json, write_json

PROBE_FILE = "precision.json"
PROBE_SIZE = 512  # big enough for a fast bf16 kernel to show, small enough for a slow one to finish in ~0.3 s
BF16_MARGIN = 1.2  # bf16 must be this much faster than fp32 to be chosen: a tie is noise, and fp32 is exact


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


@dataclass(frozen=True)
class Precision:
    """The autocast dtype training and evaluation use (None = plain fp32), and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    def __str__(self) -> str:
        return f"{'bf16' if self.dtype is not None else 'fp32'} ({self.reason})"


def choose_precision(device: torch.device, precision: str) -> Precision:
    """precision "auto" | "fp32" | "bf16" on `device` -> the Precision to train in (auto: see the module docstring)."""
    if precision == "fp32":
        return Precision(None, "asked for")
    if precision == "bf16":
        return Precision(torch.bfloat16, "asked for")
    if precision != "auto":
        raise UserError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision(None, f"auto: {torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Precision(None, f"auto: fp32 on {device.type}")
    speeds = cpu_matmul_speeds()
    faster = speeds["bf16_gflops"] > BF16_MARGIN * speeds["fp32_gflops"]
    measured = (
        f"auto: bf16 matmul {speeds['bf16_gflops']:.3g} GFLOP/s vs fp32 {speeds['fp32_gflops']:.3g} on this CPU, "
        f"{torch.get_num_threads()} threads"
    )
    return Precision(torch.bfloat16 if faster else None, measured)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """precision "auto" | "fp32" | "bf16" -> the autocast dtype, or None for plain fp32."""
    return choose_precision(device, precision).dtype


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags" on x86, "Features" on ARM); {} off Linux."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_key() -> str:
    """This CPU as the probe cache knows it: model name, instruction-set flags (hashed), threads, torch version."""
    fields = cpu_info()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features", "")  # x86 | ARM
    flags = flags or torch.backends.cpu.get_cpu_capability()  # not Linux: torch's detected capability stands in
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | {torch.get_num_threads()} threads | torch {torch.__version__}"


@functools.cache
def cpu_matmul_speeds() -> dict[str, float]:
    """{"fp32_gflops", "bf16_gflops"} of this CPU: from the probe cache, or measured now and cached."""
    path = cache_root() / PROBE_FILE
    key = cpu_key()
    try:
        cached = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    speeds = measure_matmul_speeds()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**cached, key: speeds})
    except OSError:  # a read-only cache costs a probe per process, nothing else
        pass
    return speeds


def measure_matmul_speeds(size: int = PROBE_SIZE, budget_seconds: float = 0.2) -> dict[str, float]:
    """GFLOP/s of a size x size matmul in fp32 and in bf16: the best of a few, each dtype within a time budget."""
    speeds = {}
    for name, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        a @ b  # warm-up: thread pool, allocator, kernel choice
        best = spent = time.perf_counter() - start  # a slow kernel is measured by its warm-up alone
        for _ in range(5 if spent < budget_seconds else 0):
            start = time.perf_counter()
            a @ b
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if spent > budget_seconds:
                break
        speeds[name] = 2 * size**3 / best / 1e9
    return speeds


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
