"""Plots and Markdown for run reports: what people would rather look at than read.

Knows metric records (the lines of metrics.jsonl), not models.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.run_folder import atomic_write_bytes


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path, title: str = "loss") -> None:
    """Training loss (raw and smoothed) and validation loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in servers and CI
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        axes.plot(steps, _smooth(losses, 0.9 if len(losses) > 200 else 0.6), color="tab:blue", label="train (smoothed)")
    if valid:
        steps, losses = zip(*valid)
        axes.plot(steps, losses, "o-", color="tab:orange", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard shows it."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
