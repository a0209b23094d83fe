"""Plots and Markdown for run reports: what people would rather look at than read.

Knows metric records (the lines of metrics.jsonl), not models.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import Note
from lmforge.run_folder import atomic_write_bytes

# Fonts with the CJK Unified Ideographs, best first: Debian's fonts-noto-cjk and fonts-wqy-zenhei, then the
# ones macOS and Windows ship.
CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei", "PingFang SC", "Heiti SC", "Microsoft YaHei", "SimHei", "Noto Serif CJK SC",
)  # fmt: skip
FONT_HINT = "apt-get install fonts-noto-cjk (Debian/Ubuntu), or any font named in lmforge.evaluate.report.CJK_FONTS"


def pyplot():
    """matplotlib's pyplot, drawing off-screen with a CJK font first in line, so Chinese never shows as boxes."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in servers and CI
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font is not None:
        # A list of families: matplotlib falls back glyph by glyph, to DejaVu for what the CJK font lacks (␞, ...).
        plt.rcParams["font.family"] = [font, "DejaVu Sans"]
        plt.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212, the minus sign
    return plt


@functools.cache
def cjk_font() -> str | None:
    """The name of the first CJK font matplotlib can use, or None, said once as a note."""
    from matplotlib import font_manager

    def known() -> str | None:
        names = {entry.name for entry in font_manager.fontManager.ttflist}
        return next((name for name in CJK_FONTS if name in names), None)

    found = known()
    if found is None:
        # matplotlib's font cache predates fonts installed since: add the system's CJK font files by hand.
        for path in font_manager.findSystemFonts():
            if any(mark in Path(path).name.lower() for mark in ("cjk", "wqy", "sourcehan", "simhei", "msyh")):
                font_manager.fontManager.addfont(path)
        found = known()
    if found is None:
        warnings.warn(f"no CJK font found: Chinese in pictures will show as empty boxes; {FONT_HINT}", Note, 2)
    return found


def save_png(figure, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG atomically and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, ylabel: str, title: str) -> bool:
    """Validation curves {label: [(step, value)]} as a PNG; False (nothing written) until one has two points."""
    curves = {label: points for label, points in curves.items() if points}
    if not any(len(points) >= 2 for points in curves.values()):
        return False
    figure, axes = pyplot().subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        axes.plot(*zip(*points), marker="o", label=label)
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    figure.set_dpi(120)
    figure.tight_layout()
    save_png(figure, path)
    return True


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path, title: str = "loss") -> None:
    """Training loss (raw and smoothed) and validation loss against the optimizer step, as a PNG."""
    plt = pyplot()
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
    save_png(figure, path)


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
