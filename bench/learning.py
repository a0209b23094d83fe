"""Time to loss: lmforge's demo recipe against the standard stack, same tokenizer, data and clock.

    python bench/learning.py [--reference-minutes 5] [--ours-minutes 2] [--runs 2] [--clock cpu|wall]

(a) lmforge: `demo.yaml` as `lmforge demo` trains it (our decoder, optimizer, schedule
    fitted to the budget), for --ours-minutes.
(b) the reference: `transformers`' LlamaForCausalLM at the shape of the demo recipe of
    2026-12-05 (before the recipe search) with `torch.optim.AdamW` at that recipe's
    hyperparameters and schedule, fp32, for --reference-minutes: what a user of the
    standard stack gets.
Both read the same windows in the same order from a tokenizer trained once. Validation
bits per character is measured at ten points of each budget (evaluation time is not
counted). The time-to-loss ratio is the reference's budget over the time lmforge took to
reach the reference's final bits per character. Each side runs --runs times with
different seeds, alternating, and the spread is printed.

--clock cpu counts the process's CPU time with one thread, which other jobs on a shared
machine cannot inflate; --clock wall counts wall time with torch's default threads.
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from _common import print_table
from torch import nn

from lmforge.demo import demo_recipe_path
from lmforge.evaluate.perplexity import evaluate_lm
from lmforge.export.hf import llama_config
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks.causal_lm import load_recipe, prepare_tokenizer, training_windows
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import TrainConfig, learning_rate

# The demo recipe as it was before the search (recipes/demo.yaml at 4e6a484): shape and AdamW hyperparameters.
REFERENCE_MODEL = dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=4, intermediate_size=704)
REFERENCE_TRAIN = TrainConfig(
    max_steps=420, batch_size=8, lr=2e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95
)
EVAL_POINTS = 10


class Clock:
    def __init__(self, kind: str) -> None:
        self.read = time.process_time if kind == "cpu" else time.perf_counter
        self.spent, self.since = 0.0, None

    def start(self) -> None:
        self.since = self.read()

    def stop(self) -> None:
        self.spent += self.read() - self.since


class HFLogits(nn.Module):
    """LlamaForCausalLM behind the (ids -> logits) call our evaluation makes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def clipped_step(model: nn.Module, loss: torch.Tensor, optimizers: list, grad_clip: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference_side(vocab_size: int, context: int, seed: int):
    """(model as evaluated, step(step, batch, seconds spent)) for LlamaForCausalLM + torch AdamW, step schedule."""
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=vocab_size, max_position_embeddings=context, **REFERENCE_MODEL)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config), attn_implementation="sdpa"))
    train = REFERENCE_TRAIN
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay
    )

    def step(index: int, batch, spent: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(index, train)
        inputs, targets = batch
        logits = model(input_ids=inputs).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        clipped_step(model, loss, [optimizer], train.grad_clip)

    return HFLogits(model), step


def ours_side(recipe, vocab_size: int, seed: int, minutes: float):
    """(model, step(step, batch, seconds spent)) for lmforge's decoder, optimizer and budget-fitted schedule."""
    torch.manual_seed(seed)
    model = Decoder(replace(recipe.model, vocab_size=vocab_size))
    train = replace(recipe.train, max_minutes=minutes, max_steps=10**6)
    optimizer = build_optimizer(model, train)

    def step(index: int, batch, spent: float) -> None:
        optimizer.set_learning_rate(learning_rate(index, train, spent) / train.lr)
        clipped_step(model, causal_lm_loss(model, batch)[0], optimizer.parts, train.grad_clip)

    return model, step


def run_side(side, windows, token_bytes, batch_size: int, minutes: float, clock_kind: str) -> list:
    """[(seconds on the clock, validation bits per char)] at the start and at EVAL_POINTS points of the budget."""
    evaluated, step = side
    train_windows, valid_windows = windows
    budget = minutes * 60

    def bits() -> float:
        return evaluate_lm(evaluated, valid_windows, token_bytes, batch_size=16)["bits_per_char"]

    curve, clock, index = [(0.0, bits())], Clock(clock_kind), 0
    evaluated.train()
    while clock.spent < budget:
        clock.start()
        step(index, train_windows.training_batch(index, batch_size), clock.spent)
        index += 1
        clock.stop()
        if clock.spent >= budget * len(curve) / EVAL_POINTS or clock.spent >= budget:
            curve.append((clock.spent, bits()))
            evaluated.train()
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the curve is at or below `target`, interpolated between evaluations; None if never."""
    for (t0, b0), (t1, b1) in zip(curve, curve[1:], strict=False):
        if b1 <= target:
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1) if b0 > target else t0
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-minutes", type=float, default=5.0)
    parser.add_argument("--ours-minutes", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="wall")
    parser.add_argument("--json", help="also write the curves here")
    args = parser.parse_args()
    if args.clock == "cpu":
        torch.set_num_threads(1)
    recipe = load_recipe(demo_recipe_path())
    data = recipe.data
    tokenizer = prepare_tokenizer(data, Path(tempfile.mkdtemp()), progress=False)
    fractions = (data.valid_fraction, data.test_fraction)
    windows = training_windows(data.source, tokenizer, data.context, fractions, seed=0, progress=False)
    token_bytes = tokenizer.token_bytes()
    print(
        f"{data.source}, {tokenizer.vocab_size}-token tokenizer, context {data.context}; clock: {args.clock}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    curves: dict[str, list] = {"reference": [], "lmforge": []}
    for run in range(args.runs):
        reference = reference_side(tokenizer.vocab_size, data.context, seed=run)
        curves["reference"].append(
            run_side(reference, windows, token_bytes, REFERENCE_TRAIN.batch_size, args.reference_minutes, args.clock)
        )
        ours = ours_side(recipe, tokenizer.vocab_size, run, args.ours_minutes)
        curves["lmforge"].append(
            run_side(ours, windows, token_bytes, recipe.train.batch_size, args.ours_minutes, args.clock)
        )
        for name in curves:
            curve = curves[name][-1]
            print(f"{name} run {run}: " + ", ".join(f"{t:.0f}s {b:.3f}" for t, b in curve), flush=True)
    report(curves, args)


def report(curves: dict[str, list], args) -> None:
    finals = {name: [curve[-1][1] for curve in runs] for name, runs in curves.items()}
    target = statistics.mean(finals["reference"])
    reach = [time_to_reach(curve, target) for curve in curves["lmforge"]]
    rows = [
        [name, f"{minutes:g} min", " / ".join(f"{value:.3f}" for value in values), f"{max(values) - min(values):.3f}"]
        for (name, values), minutes in zip(finals.items(), (args.reference_minutes, args.ours_minutes), strict=True)
    ]
    print_table(["side", "budget", "final validation bits/char per run", "spread"], rows)
    if any(seconds is None for seconds in reach):
        print(f"lmforge did not reach the reference's {target:.3f} bits/char within {args.ours_minutes:g} minutes")
    else:
        ratio = args.reference_minutes * 60 / statistics.mean(reach)
        print(f"lmforge reached the reference's {target:.3f} bits/char after {', '.join(f'{s:.0f}' for s in reach)} s; "
              f"time-to-loss ratio {ratio:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"curves": curves, "target": target, "reach_seconds": reach}))


if __name__ == "__main__":
    main()
