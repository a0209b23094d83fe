"""The demo recipe search: each variant of `demo.yaml` trained for the same quiet-machine time, scored on validation.

    python bench/recipe_search.py --budget 300 --variants baseline,lr3e-3,...  [--out runs/search]

On a shared machine wall time is noise, so a variant's budget is counted in steps: its
step cost is measured first as the CPU time of one thread (the least of a few timed
steps, which other jobs on the machine cannot inflate), and it trains for
`budget / step cost` steps with the schedule spanning exactly those steps. Runs use one
thread, so two searches can share a 2-core machine. One JSON line per variant goes to
`<out>/results.jsonl`: validation bits per character, steps, step cost.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from lmforge.config import merge
from lmforge.demo import demo_recipe_path
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks.base import run_task
from lmforge.tasks.causal_lm import TASK, load_recipe
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer

NARROW192 = {"hidden_size": 192, "num_heads": 3, "num_kv_heads": 3, "intermediate_size": 512}
NARROW128 = {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 352}
NARROW96 = {"hidden_size": 96, "num_heads": 3, "num_kv_heads": 3, "intermediate_size": 256}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "lr3e-3": {"train": {"lr": 3e-3}},
    "lr4e-3": {"train": {"lr": 4e-3}},
    "min-lr-0": {"train": {"min_lr_ratio": 0.0}},
    "batch4": {"train": {"batch_size": 4}},
    "batch16": {"train": {"batch_size": 16}},
    "ctx128-batch16": {"data": {"context": 128}, "train": {"batch_size": 16}},
    "vocab4096": {"data": {"vocab_size": 4096}},
    "vocab2048": {"data": {"vocab_size": 2048}},
    "narrow192": {"model": NARROW192},
    "shallow4": {"model": {"num_layers": 4}},
    "deep8-narrow192": {"model": {**NARROW192, "num_layers": 8}},
    "narrow192-lr4e-3": {"model": NARROW192, "train": {"lr": 4e-3}},
    "narrow192-shallow4": {"model": {**NARROW192, "num_layers": 4}},
    "narrow128": {"model": NARROW128},
    "narrow128-shallow4": {"model": {**NARROW128, "num_layers": 4}},
    "narrow128-lr4e-3": {"model": NARROW128, "train": {"lr": 4e-3}},
    "narrow128-muon": {"model": NARROW128, "train": {"optimizer": "muon"}},
    "narrow128-batch4": {"model": NARROW128, "train": {"batch_size": 4}},
    "narrow128-muon-lr0.04": {"model": NARROW128, "train": {"optimizer": "muon", "muon_lr": 0.04}},
    "narrow128-muon-lr3e-3": {"model": NARROW128, "train": {"optimizer": "muon", "lr": 3e-3}},
    "narrow128-muon-shallow4": {"model": {**NARROW128, "num_layers": 4}, "train": {"optimizer": "muon"}},
    "narrow128-muon-batch16": {"model": NARROW128, "train": {"optimizer": "muon", "batch_size": 16}},
    "narrow96-muon": {"model": NARROW96, "train": {"optimizer": "muon"}},
    "narrow96": {"model": NARROW96},
    "narrow96-muon-lr6e-3": {"model": NARROW96, "train": {"optimizer": "muon", "lr": 6e-3}},
    "narrow96-muon-lr1e-2": {"model": NARROW96, "train": {"optimizer": "muon", "lr": 1e-2}},
    "narrow96-muon-ctx128": {
        "model": NARROW96, "data": {"context": 128}, "train": {"optimizer": "muon", "batch_size": 16}
    },
    "narrow64-muon": {"model": {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 176},
                      "train": {"optimizer": "muon"}},
    "narrow192-muon": {"model": NARROW192, "train": {"optimizer": "muon"}},
    "narrow192-batch4": {"model": NARROW192, "train": {"batch_size": 4}},
    "narrow192-muon-batch4": {"model": NARROW192, "train": {"optimizer": "muon", "batch_size": 4}},
    "untied": {"model": {"tie_word_embeddings": False}},
    "muon": {"train": {"optimizer": "muon"}},
    "wd0": {"train": {"weight_decay": 0.0}},
    "warmup10": {"train": {"warmup_steps": 10}},
}


def step_seconds(recipe, vocab_size: int, steps: int = 6) -> float:
    """The least CPU time of `steps` training steps (forward, backward, clip, optimizer) on random tokens."""
    torch.manual_seed(0)
    config = DecoderConfig(**{**recipe.model.__dict__, "vocab_size": vocab_size})
    model = Decoder(config)
    optimizer = build_optimizer(model, recipe.train)
    shape = (recipe.train.batch_size, recipe.data.context)
    best = float("inf")
    for index in range(steps + 2):
        inputs, targets = torch.randint(vocab_size, shape), torch.randint(vocab_size, shape)
        start = time.process_time()
        for _ in range(recipe.train.grad_accum):
            causal_lm_loss(model, (inputs, targets))[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= 2:  # the first steps warm the allocator and the thread pool
            best = min(best, time.process_time() - start)
    return best


def run_variant(name: str, overrides: dict, budget: float, out: Path, extra: dict) -> dict:
    overrides = merge(overrides, extra)
    recipe = load_recipe(demo_recipe_path(), merge(overrides, {"train": {"max_minutes": 0}}))
    seconds = step_seconds(recipe, recipe.data.vocab_size)
    steps = max(20, int(budget / seconds))
    warmup = min(recipe.train.warmup_steps, steps // 10)
    train = {"max_steps": steps, "warmup_steps": warmup, "eval_every": 0, "save_every": steps, "max_minutes": 0}
    recipe = load_recipe(demo_recipe_path(), merge(overrides, {"train": train}))
    started = time.perf_counter()
    metrics = run_task(TASK, recipe, out / name, progress=False)
    result = {
        "variant": name,
        "overrides": overrides,
        "bits_per_char": metrics.get("bits_per_char"),
        "loss": metrics.get("loss"),
        "steps": steps,
        "step_seconds": round(seconds, 4),
        "budget_seconds": budget,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    with open(out / "results.jsonl", "a") as results:
        results.write(json.dumps(result) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="one-thread CPU seconds of training per variant")
    parser.add_argument("--variants", default="baseline", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", default="{}", help="extra overrides for every variant, as JSON")
    parser.add_argument("--out", default="runs/search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        result = run_variant(name, VARIANTS[name], args.budget, out, json.loads(args.json))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
