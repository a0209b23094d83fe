"""An `Explanation` as pictures (PNG), one self-contained HTML viewer, and a terminal summary.

PNGs go through evaluate/report.py's `pyplot`, which puts a CJK font first, so Chinese tokens are glyphs, not
boxes. Long inputs are windowed: pictures show at most `MAX_PICTURE_TOKENS` tokens and the viewer
`MAX_VIEWER_TOKENS`, each saying so; the arrays keep everything.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from lmforge.evaluate.report import pyplot, save_png
from lmforge.run_folder import atomic_write_text

MAX_PICTURE_TOKENS = 40  # per axis of an attention picture: more is unreadable at any size
MAX_VIEWER_TOKENS = 160  # per axis in the HTML viewer: layers x heads x 160^2 cells stay a few MB
CAUSAL_STACKS = ("self", "decoder")  # where the end of the text matters most: windows keep the last tokens
METHODS = {
    "integrated_gradients": "integrated gradients",
    "gradient_x_input": "gradient × input",
    "occlusion": "occlusion (leave one out)",
}


def save_explanation(explanation, folder: Path) -> list[Path]:
    """All pictures and explain.html in `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stack, maps in explanation.attention.items():
        for layer in range(maps.shape[0]):
            path = folder / f"attention-{stack}-layer{layer + 1}.png"
            plot_attention_layer(explanation, stack, layer, path)
            written.append(path)
    written.append(folder / "heads.png")
    plot_heads(explanation, written[-1])
    written.append(folder / "attribution.png")
    plot_attribution(explanation, written[-1])
    if explanation.lens is not None:
        written.append(folder / "lens.png")
        plot_lens(explanation.lens, written[-1])
    written.append(folder / "explain.html")
    atomic_write_text(written[-1], viewer_html(explanation))
    return written


def _window(length: int, limit: int, causal: bool) -> slice:
    if length <= limit:
        return slice(0, length)
    return slice(length - limit, length) if causal else slice(0, limit)


def plot_attention_layer(explanation, stack: str, layer: int, path: Path) -> None:
    """One layer's heads side by side: rows are queries, columns keys, darker = more attention."""
    plt = pyplot()
    maps = explanation.attention[stack][layer]  # (H, T, S)
    queries, keys = explanation.attention_tokens[stack]
    causal = stack in CAUSAL_STACKS
    rows, columns = _window(len(queries), MAX_PICTURE_TOKENS, causal), _window(len(keys), MAX_PICTURE_TOKENS, causal)
    heads = maps.shape[0]
    per_row = min(heads, 4)
    grid_rows = -(-heads // per_row)
    side = 1.6 + 0.14 * max(rows.stop - rows.start, columns.stop - columns.start)
    figure, axes = plt.subplots(
        grid_rows, per_row, figsize=(side * per_row, side * grid_rows + 0.5), dpi=90, squeeze=False
    )
    for head, axis in enumerate(axes.flat):
        if head >= heads:
            axis.axis("off")
            continue
        shown = maps[head, rows, columns]
        # Each head on its own scale (its largest weight darkest): near-uniform heads would all read as white.
        axis.imshow(shown, cmap="Blues", vmin=0, vmax=max(float(shown.max()), 1e-6))
        axis.set_title(f"head {head + 1} (darkest {shown.max():.2f})", fontsize=9)
        axis.set_xticks(range(columns.stop - columns.start), keys[columns], rotation=90, fontsize=7)
        axis.set_yticks(range(rows.stop - rows.start), queries[rows], fontsize=7)
    window = "" if (rows.stop - rows.start, columns.stop - columns.start) == (len(queries), len(keys)) else (
        f" (showing {rows.stop - rows.start} of {len(queries)} x {columns.stop - columns.start} of {len(keys)} tokens)"
    )  # fmt: skip
    figure.suptitle(f"{_stack_title(stack)} attention, layer {layer + 1}{window}", fontsize=10)
    figure.tight_layout()
    save_png(figure, path)


def _stack_title(stack: str) -> str:
    return {"self": "self", "encoder": "encoder self", "decoder": "decoder self", "cross": "cross"}[stack]


def plot_heads(explanation, path: Path) -> None:
    """Per stack, three (layer x head) maps: entropy, mean distance, share of attention on special tokens."""
    plt = pyplot()
    stacks = list(explanation.heads)
    titles = {"entropy": "entropy (nats)", "distance": "mean distance (tokens)", "special": "share on special tokens"}
    layers, heads = next(iter(explanation.heads.values()))["entropy"].shape
    cell = 0.45
    figure, axes = plt.subplots(
        len(stacks), 3, figsize=(3 * (1.5 + cell * heads), len(stacks) * (1.2 + cell * layers)), dpi=90, squeeze=False
    )
    for row, stack in enumerate(stacks):
        for column, (key, title) in enumerate(titles.items()):
            values = explanation.heads[stack][key]
            axis = axes[row, column]
            axis.imshow(values, cmap="viridis", aspect="auto")
            for (layer, head), value in np.ndenumerate(values):
                axis.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7, color="white")
            axis.set_xticks(range(values.shape[1]), [str(h + 1) for h in range(values.shape[1])], fontsize=7)
            axis.set_yticks(range(values.shape[0]), [str(n + 1) for n in range(values.shape[0])], fontsize=7)
            axis.set_xlabel("head", fontsize=8)
            axis.set_ylabel("layer", fontsize=8)
            axis.set_title(f"{_stack_title(stack)}: {title}", fontsize=9)
    figure.tight_layout()
    save_png(figure, path)


def plot_attribution(explanation, path: Path) -> None:
    """The input as coloured text, once per method: red pushed the score up, blue pushed it down."""
    plt = pyplot()
    colours = plt.get_cmap("RdBu_r")
    tokens = explanation.tokens[: MAX_PICTURE_TOKENS * 2]
    per_line = 14
    lines = -(-len(tokens) // per_line)
    figure, axis = plt.subplots(figsize=(9, 0.8 + len(METHODS) * (0.5 + 0.42 * lines)), dpi=100)
    axis.axis("off")
    y = 0.0
    for key, name in METHODS.items():
        values = getattr(explanation, key)[: len(tokens)]
        scale = float(np.abs(values).max()) or 1.0
        axis.text(0, y, f"{name}  (largest |value| {scale:.3g})", fontsize=9, weight="bold", va="top")
        y -= 0.5
        for index, (token, value) in enumerate(zip(tokens, values)):
            column, line = index % per_line, index // per_line
            axis.text(
                column * (1 / per_line), y - 0.42 * line, token or "␣", fontsize=10, va="top",
                bbox={"facecolor": colours(0.5 + 0.5 * value / scale), "edgecolor": "none", "pad": 2},
            )  # fmt: skip
        y -= 0.42 * lines + 0.2
    axis.set_xlim(0, 1.05)
    axis.set_ylim(y, 0.3)
    shown = "" if len(tokens) == len(explanation.tokens) else f", first {len(tokens)} of {len(explanation.tokens)}"
    axis.set_title(f"why {explanation.target!r}: attributions over the input{shown}", fontsize=10)
    figure.tight_layout()
    save_png(figure, path)


def plot_lens(lens: dict, path: Path) -> None:
    """Rank (log scale) of each position's next token after each layer, the layer's top-1 guess written in."""
    plt = pyplot()
    rank = lens["rank"][:, :-1]  # (L, T - 1): the last position has no next token in the text
    tokens = lens["tokens"]
    window = _window(rank.shape[1], MAX_PICTURE_TOKENS, True)
    rank = rank[:, window]
    layers, positions = rank.shape
    figure, axis = plt.subplots(figsize=(2 + 0.45 * positions, 1.5 + 0.4 * layers), dpi=90)
    image = axis.imshow(np.log10(rank + 1), cmap="magma_r", aspect="auto", vmin=0)
    figure.colorbar(image, ax=axis, label="log10(rank + 1)")
    for layer in range(layers):
        for column in range(positions):
            guess = lens["top_tokens"][layer][window.start + column][0]
            axis.text(column, layer, guess[:4], ha="center", va="center", fontsize=7, color="c")
    axis.set_xticks(range(positions), [f"{t}→{n}" for t, n in zip(tokens[window], tokens[window.start + 1 :])],
                    rotation=90, fontsize=7)  # fmt: skip
    axis.set_yticks(range(layers), [str(layer + 1) for layer in range(layers)], fontsize=7)
    axis.set_ylabel("layer")
    title = "logit lens: rank of the true next token per layer\n(0 = top; the layer's top guess in each cell)"
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    save_png(figure, path)


def viewer_html(explanation) -> str:
    """One HTML file, no network: pick a stack, layer and head; hover a token to see its attention row."""
    data = viewer_data(explanation)
    # "</" inside a script would end it: JSON allows the escaped form.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = resources.files("lmforge.explain").joinpath("static", "viewer.html").read_text(encoding="utf-8")
    return page.replace("/*DATA*/null", payload)


def viewer_data(explanation) -> dict:
    stacks = {}
    for stack, maps in explanation.attention.items():
        queries, keys = explanation.attention_tokens[stack]
        causal = stack in CAUSAL_STACKS
        rows, columns = _window(len(queries), MAX_VIEWER_TOKENS, causal), _window(len(keys), MAX_VIEWER_TOKENS, causal)
        stacks[stack] = {
            "title": _stack_title(stack),
            "queries": queries[rows], "keys": keys[columns], "total": [len(queries), len(keys)],
            "maps": np.round(maps[:, :, rows, columns], 3).tolist(),
            "heads": {key: np.round(value, 3).tolist() for key, value in explanation.heads[stack].items()},
        }  # fmt: skip
    attribution = {name: getattr(explanation, key).round(5).tolist() for key, name in METHODS.items()}
    lens = None
    if explanation.lens is not None:
        window = _window(len(explanation.lens["tokens"]), MAX_VIEWER_TOKENS, True)
        lens = {
            "tokens": explanation.lens["tokens"][window],
            "top": [[position[:3] for position in layer[window]] for layer in explanation.lens["top_tokens"]],
            "rank": explanation.lens["rank"][:, window].tolist(),
        }
    return {
        "family": explanation.family, "text": explanation.text, "target": explanation.target,
        "score": explanation.score, "probabilities": explanation.probabilities, "stacks": stacks,
        "tokens": explanation.tokens, "attribution": attribution, "lens": lens,
        "completeness": {"error": explanation.completeness_error, "steps": explanation.steps},
    }  # fmt: skip


def describe(explanation, top: int = 8) -> str:
    """The terminal summary: what was explained, the completeness check, the tokens ranked, the heads."""
    lines = [f"{explanation.family}: explaining {explanation.target!r} (log-probability {explanation.score:.4f})"]
    if explanation.probabilities:
        lines.append("  " + ", ".join(f"P({label}) = {p:.3f}" for label, p in explanation.probabilities.items()))
    change = explanation.score - explanation.baseline_score
    lines.append(
        f"integrated gradients, {explanation.steps} steps: attributions sum to "
        f"{explanation.integrated_gradients.sum():.4f}, f(input) - f(baseline) = {change:.4f}, "
        f"completeness error {explanation.completeness_error:.2%}"
    )
    order = np.argsort(-np.abs(explanation.integrated_gradients))[:top]
    lines.append(f"tokens that mattered most ({'integrated gradients':>20} {'gradient×input':>15} {'occlusion':>10}):")
    for index in order:
        token = explanation.tokens[index]
        lines.append(
            f"  {index:>4} {token!r:<16} {explanation.integrated_gradients[index]:+20.4f} "
            f"{explanation.gradient_x_input[index]:+15.4f} {explanation.occlusion[index]:+10.4f}"
        )
    for stack, summary in explanation.heads.items():
        layer, head = np.unravel_index(np.argmin(summary["entropy"]), summary["entropy"].shape)
        lines.append(
            f"{_stack_title(stack)} attention: most focused head layer {layer + 1} head {head + 1} "
            f"(entropy {summary['entropy'][layer, head]:.2f} nats); mean share on special tokens "
            f"{summary['special'].mean():.0%}"
        )
    if explanation.lens is not None:
        position = len(explanation.tokens) - 1  # the last prompt token: where the continuation is predicted
        lines.append(f"logit lens at the last prompt token {explanation.tokens[position]!r}, top guesses per layer:")
        for layer, guesses in enumerate(explanation.lens["top_tokens"]):
            lines.append(f"  layer {layer + 1:>2}: " + "  ".join(repr(guess) for guess in guesses[position][:3]))
    return "\n".join(lines)
