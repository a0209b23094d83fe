"""Shared by the benchmarks: the machine's measured peak, interleaved rounds, and a table printer.

Timings on a shared 2-core machine swing ±20% between rounds, so every benchmark
runs lmforge and its reference in the same process, alternating round by round,
and reports the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def matmul_gflops(size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    a @ b  # warm-up: thread pool, allocator
    best = time.perf_counter() - start
    # A slow kernel (bf16 on an AVX2-only CPU: ~17 s for 2048²) is measured by its warm-up alone.
    for _ in range(repeats if best < 1.0 else 0):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def copy_gbytes_per_second(megabytes: int = 256, repeats: int = 5) -> float:
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9  # read + write


def measure_peak() -> dict[str, float]:
    return {
        "fp32_gflops": max(matmul_gflops(2048, torch.float32), matmul_gflops(1024, torch.float32, 10)),
        "bf16_gflops": matmul_gflops(2048, torch.bfloat16, 3),
        "copy_gbytes_per_second": copy_gbytes_per_second(),
    }


def interleaved(
    contenders: dict[str, Callable[[], float]], rounds: int = 7, reference: str | None = None
) -> dict[str, list[float]]:
    """Run each contender once per round, alternating the order; each returns a rate (higher is better)."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for index in range(rounds):
        order = names if index % 2 == 0 else list(reversed(names))
        for name in order:
            results[name].append(contenders[name]())
        line = "  ".join(f"{name} {results[name][-1]:,.0f}" for name in names)
        print(f"  round {index + 1}/{rounds}: {line}", flush=True)
    return results


def median_ratio(results: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(results[numerator], results[denominator]))


def print_table(header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
