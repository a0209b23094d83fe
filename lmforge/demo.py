"""`lmforge demo`: the whole pipeline on the built-in corpus in about five minutes on two CPU cores.

Trains a tokenizer on People's Daily (January 1998), pretrains a small decoder
with the packaged `demo.yaml` recipe, measures validation perplexity and bits
per character before and after, continues three Chinese prompts, and writes
`report.md` beside the run folder's weights, metrics and loss plot.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import tokenizer_stats
from lmforge.evaluate.report import markdown_table
from lmforge.lm import LM
from lmforge.run_folder import atomic_write_text
from lmforge.train.pretrain import load_recipe, pretrain

PROMPTS = ["中国人民", "新华社北京１月１日电", "今年经济工作的"]


def demo_recipe_path() -> Path:
    return Path(str(importlib.resources.files("lmforge.recipes") / "demo.yaml"))


def run_demo(out_dir: str | Path = "runs/demo", minutes: float = 5.0, device: str = "auto") -> Path:
    out_dir = Path(out_dir)
    recipe = load_recipe(demo_recipe_path(), {"device": device, "train": {"max_minutes": minutes}})
    started = time.perf_counter()
    result = pretrain(recipe, out_dir)
    elapsed = time.perf_counter() - started
    data = recipe.data
    valid_texts = [record_text(r) for r in read_split(data.source, "valid", data.valid_fraction, data.test_fraction)]
    stats = tokenizer_stats(result.tokenizer, valid_texts)
    lm = LM(result.model, result.tokenizer, recipe.generation)
    samples = [(prompt, lm.generate(prompt, seed=0)) for prompt in PROMPTS]
    greedy = [(prompt, lm.generate(prompt, temperature=0, max_new_tokens=40)) for prompt in PROMPTS]
    train_records = [r for r in result.records if "tokens_per_second" in r]
    steps = train_records[-1]["step"] if train_records else 0
    tokens = train_records[-1]["tokens"] if train_records else 0
    training_seconds = train_records[-1]["elapsed"] if train_records else 0.0

    numbers = markdown_table(
        ["validation", "before training", "after training"],
        [
            ["loss (nats/token)", result.before["loss"], result.after["loss"]],
            ["perplexity", result.before["perplexity"], result.after["perplexity"]],
            ["bits per character", result.before["bits_per_char"], result.after["bits_per_char"]],
            ["bits per byte", result.before["bits_per_byte"], result.after["bits_per_byte"]],
        ],
    )
    tokenizer_table = markdown_table(
        ["script", "characters", "tokens", "characters/token", "bytes/token"],
        [
            [language, int(s["characters"]), int(s["tokens"]), s["chars_per_token"], s["bytes_per_token"]]
            if (s := stats.get(language))
            else [language, 0, 0, "—", "— (no such text in the validation split)"]
            for language in ("zh", "en")
        ],
    )
    sample_text = "\n\n".join(f"**{prompt}** → {prompt}{text}" for prompt, text in samples)
    greedy_text = "\n\n".join(f"**{prompt}** → {prompt}{text}" for prompt, text in greedy)
    report = f"""# lmforge demo

Pretraining a {result.model.num_parameters():,}-parameter decoder on `{data.source}` \
({len(valid_texts):,} validation paragraphs held out by hash).
{steps} steps, {tokens:,} training tokens in {training_seconds / 60:.1f} minutes \
({tokens / max(training_seconds, 1e-9):,.0f} tokens/s); the whole demo took {elapsed / 60:.1f} minutes.
Recipe: `{demo_recipe_path().name}` (saved in full as `recipe.json`).

## Validation ({result.after["tokens"]:,} tokens)

{numbers}

## Tokenizer ({result.tokenizer.vocab_size:,} tokens, byte-level BPE) on validation text

{tokenizer_table}

## Samples (temperature {recipe.generation.temperature}, top-k {recipe.generation.top_k}, \
top-p {recipe.generation.top_p}, repetition penalty {recipe.generation.repetition_penalty}, seed 0)

{sample_text}

## Greedy

{greedy_text}

## Loss

![loss](loss.png)
"""
    atomic_write_text(out_dir / "report.md", report)
    print(f"\n{numbers}\n")
    for prompt, text in samples:
        print(f"{prompt} → {prompt}{text}\n")
    print(f'report: {out_dir / "report.md"}   (chat with it: lmforge generate --model {out_dir} "{PROMPTS[0]}")')
    return out_dir
