"""Chat SFT variants side by side: exact match per instruction kind on the *validation* instructions.

    python bench/chat_variants.py --base runs/demo --out /tmp/chat-variants \\
        --variant old '{"mix": {"share": 0}, "train": {"lr": 5e-4}}' \\
        --variant lr2e-3 '{"train": {"lr": 2e-3}}' [--steps 300] [--threads 1]

Each variant is `recipes/demo-chat.yaml` with the variant's overrides (JSON, nested like the recipe), trained
for a fixed number of steps rather than minutes, so a busy machine gets the same models as a quiet one. Scores
come from the validation split, never the test split, so choosing a recipe here leaves the test split held out;
`lmforge eval --task chat --split test` scores the chosen one. Prints one row per variant: steps/minute, the
validation exact match overall and per kind, and the greedy reply to "你好，请介绍一下你自己。".
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _common import print_table

from lmforge.config import from_dict, load_yaml, merge
from lmforge.data.instructions import CHECKABLE_KINDS
from lmforge.demo import demo_recipe_path
from lmforge.lm import load
from lmforge.tasks import chat
from lmforge.tasks.base import run_task


def validation_scores(model_dir, data, split="valid", out_dir=None, training_minutes=None, progress=True,
                      max_new_tokens=48) -> dict:  # fmt: skip
    """Exact match on the validation split's checkable instructions, and the free-form replies."""
    lm = load(model_dir)
    records = chat.conversations(data, "valid")
    checkable = [
        r
        for r in records
        if r.get("kind") in CHECKABLE_KINDS and chat.fits_context(lm, r["messages"][:-1], max_new_tokens)
    ]
    scores, _ = chat.instruction_accuracy(lm, checkable, max_new_tokens)
    return {**scores, "training_minutes": training_minutes, "free_form": chat.free_form_exchanges(lm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the pretrained decoder's run folder")
    parser.add_argument("--out", required=True, help="a folder for the variants' run folders")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    task = dataclasses.replace(chat.TASK, evaluate_run=validation_scores, eval_split="valid")
    rows = []
    for name, overrides in arguments.variant:
        fixed = {"base": arguments.base, "device": "cpu", "train": {"max_steps": arguments.steps, "max_minutes": 0}}
        values = merge(merge(load_yaml(demo_recipe_path("demo-chat.yaml")), json.loads(overrides)), fixed)
        started = time.perf_counter()
        scores = run_task(task, from_dict(chat.Recipe, values), Path(arguments.out) / name, progress=False)
        minutes = (time.perf_counter() - started) / 60
        kinds = [f"accuracy_{kind}" for kind in CHECKABLE_KINDS]
        greeting = dict(scores["free_form"])[chat.FREE_FORM_PROMPTS[0]][:40].replace("\n", " ")
        accuracies = [f"{scores.get(key, 0):.3f}" for key in ["accuracy", *kinds]]
        steps_per_minute = arguments.steps / scores["training_minutes"]
        rows.append([name, f"{steps_per_minute:.0f}", f"{minutes:.1f}", *accuracies, greeting])
        print(json.dumps({"variant": name, "overrides": overrides, **scores}, ensure_ascii=False))
    print_table(["variant", "steps/min", "minutes in all", "all", *CHECKABLE_KINDS, "你好，请介绍一下你自己。"], rows)
    print(f"threads: {arguments.threads}; validation split of the recipe's data; {arguments.steps} steps each")


if __name__ == "__main__":
    main()
