"""`lmforge demo`: the whole pipeline on the built-in corpus in about seven minutes on two CPU cores.

Trains a tokenizer on People's Daily (January 1998), pretrains a small decoder
with the packaged `demo.yaml` recipe, measures validation perplexity and bits
per character before and after, and continues three Chinese prompts. Then it
fine-tunes the decoder into a chat model on `builtin:instructions` with some
general conversation mixed in (`demo-chat.yaml`, in `runs/demo/chat`), scores it
on held-out instructions beside trivial baselines, holds a scripted two-turn
conversation and shows its replies to a few free-form messages. `report.md`
gathers all of it beside the run folder's weights, metrics and loss plot.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

from lmforge.config import from_dict, load_yaml, merge
from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import tokenizer_stats
from lmforge.evaluate.metrics import degeneration
from lmforge.evaluate.report import markdown_table
from lmforge.lm import LM, load
from lmforge.run_folder import RunFolder
from lmforge.tasks import chat
from lmforge.tasks.base import run_task
from lmforge.tasks.causal_lm import TASK, PretrainRecipe, load_recipe

PROMPTS = ["中国人民", "新华社北京１月１日电", "今年经济工作的"]
CONVERSATION = [
    "这条商品评论是正面还是负面？\n房间很干净，服务员也很热情，早餐种类很多，下次还会再来。",
    "这位顾客满意吗？只回答是或否。",
]


def demo_recipe_path(name: str = "demo.yaml") -> Path:
    return Path(str(importlib.resources.files("lmforge.recipes") / name))


def chat_step(base_dir: Path, minutes: float, device: str) -> tuple[dict, list[tuple[str, str]]]:
    """Chat fine-tuning of the pretrained demo model; (its held-out metrics, a scripted two-turn conversation)."""
    overrides = {"base": str(base_dir), "device": device, "train": {"max_minutes": minutes}}
    recipe = from_dict(chat.Recipe, merge(load_yaml(demo_recipe_path("demo-chat.yaml")), overrides))
    metrics = run_task(chat.TASK, recipe, base_dir / "chat")
    lm = load(base_dir / "chat", device=device)
    messages, turns = [], []
    for question in CONVERSATION:
        messages.append({"role": "user", "content": question})
        answer = lm.chat(messages, temperature=0.0)
        messages.append({"role": "assistant", "content": answer})
        turns.append((question, answer))
    return metrics, turns


def chat_section(metrics: dict, turns: list[tuple[str, str]], chat_dir: Path) -> str:
    kinds = sorted(k.removeprefix("accuracy_") for k in metrics if k.startswith("accuracy_"))
    keys = ["accuracy", *(f"accuracy_{kind}" for kind in kinds)]
    baselines = metrics["baselines"]
    base = next((values for name, values in baselines.items() if name.startswith("base model")), {})
    trivial = [values for name, values in baselines.items() if name.startswith("trivial")]
    best_trivial = {key: max(values.get(key, 0.0) for values in trivial) for key in keys} if trivial else {}
    table = markdown_table(
        ["held-out instructions (exact match)", "all", *kinds],
        [
            [name, *(values.get(key, 0.0) for key in keys)]
            for name, values in (
                ("pretrained model", base),
                ("trivial baseline (best per column)", best_trivial),
                ("after chat fine-tuning", metrics),
            )
        ],
    )
    return f"""## Chat fine-tuning ({metrics.get("training_minutes", 0):.1f} minutes)

{table}

Scored on {metrics["examples_scored"]} held-out instructions; the trivial baselines need no model: each kind's \
most common training answer (for sentiment, the majority class) and echoing the user's message; details in \
`chat/{RunFolder.REPORT}`. Talk to it: `lmforge chat --model {chat_dir}` in the terminal, or \
`lmforge serve --model {chat_dir}` for a web chat page at http://127.0.0.1:8000/ and an OpenAI-compatible API at \
http://127.0.0.1:8000/v1

### A scripted two-turn conversation (greedy)

{chat.exchanges_text(turns)}

### Free-form exchanges (greedy, one turn each, not scored)

{chat.exchanges_text(metrics.get("free_form", []))}
"""


def run_demo(
    out_dir: str | Path = "runs/demo",
    minutes: float = 5.0,
    device: str = "auto",
    chat_minutes: float = 1.1,
    max_steps: int | None = None,
) -> Path:
    out_dir = Path(out_dir)
    train = {"max_minutes": minutes} | ({"max_steps": max_steps} if max_steps else {})
    recipe = load_recipe(demo_recipe_path(), {"device": device, "train": train})
    started = time.perf_counter()
    metrics = run_task(TASK, recipe, out_dir)
    lm = load(out_dir, device=device)
    samples = [(prompt, lm.generate(prompt, seed=0)) for prompt in PROMPTS]
    greedy = [(prompt, lm.generate(prompt, temperature=0, max_new_tokens=40)) for prompt in PROMPTS]
    chat_text = ""
    if chat_minutes > 0:
        chat_metrics, turns = chat_step(out_dir, chat_minutes, device)
        chat_text = chat_section(chat_metrics, turns, out_dir / "chat")
    elapsed = time.perf_counter() - started
    sections = pretraining_sections(recipe, lm, metrics, RunFolder(out_dir), elapsed)
    report = f"""{sections}

## Samples (temperature {recipe.generation.temperature}, top-k {recipe.generation.top_k}, \
top-p {recipe.generation.top_p}, repetition penalty {recipe.generation.repetition_penalty}, seed 0)

{_continuations(samples)}

## Greedy

{_continuations(greedy)}

## Degeneration

{degeneration_table(samples, greedy)}

## Loss

![loss]({RunFolder.LOSS_PLOT})

{chat_text}"""
    RunFolder(out_dir).write_report(report)
    print(f"\n{validation_table(metrics)}\n")
    for prompt, text in samples:
        print(f"{prompt} → {prompt}{text}\n")
    print(f"{degeneration_table(samples, greedy)}\n")
    if chat_text:
        print(chat_text)
    print(f"report: {RunFolder(out_dir).report}")
    print(f'continue text: lmforge generate --model {out_dir} "{PROMPTS[0]}"')
    if chat_minutes > 0:
        print(f"chat with it:  lmforge chat --model {out_dir / 'chat'}")
        print(f"serve it:      lmforge serve --model {out_dir / 'chat'}  (web chat page + OpenAI-compatible API)")
    return out_dir


def degeneration_table(samples: list[tuple[str, str]], greedy: list[tuple[str, str]]) -> str:
    """Distinct-2 and repeated 4-grams of the continuations (prompts left out): a loop shows as a number."""
    rows = []
    for name, pairs in (("sampled", samples), ("greedy", greedy)):
        scores = degeneration([text for _, text in pairs])
        rows.append([name, f"{scores['distinct_2']:.2f}", f"{scores['repeated_4grams']:.0%}"])
    table = markdown_table(["continuations", "distinct-2 (higher: more varied)", "repeated 4-grams (loops)"], rows)
    return (
        f"{table}\n\nDistinct-2: distinct pairs of characters (a word of Latin letters or digits counts as one) "
        "over all pairs of the three continuations; repeated 4-grams: the share of 4-grams that repeat an earlier "
        "one of the same continuation. Text that loops (`人、人、人、…`) has low distinct-2 and many repeats."
    )


def validation_table(metrics: dict) -> str:
    before, after = metrics["before"], metrics["after"]
    return markdown_table(
        ["validation", "before training", "after training"],
        [
            ["loss (nats/token)", before["loss"], after["loss"]],
            ["perplexity", before["perplexity"], after["perplexity"]],
            ["bits per character", before["bits_per_char"], after["bits_per_char"]],
            ["bits per byte", before["bits_per_byte"], after["bits_per_byte"]],
        ],
    )


def pretraining_sections(recipe: PretrainRecipe, lm: LM, metrics: dict, folder: RunFolder, elapsed: float) -> str:
    """The report's head: what was trained on, how long it took, validation before and after, the tokenizer."""
    data = recipe.data
    valid_texts = [record_text(r) for r in read_split(data.source, "valid", data.valid_fraction, data.test_fraction)]
    stats = tokenizer_stats(lm.tokenizer, valid_texts)
    train_records = [r for r in folder.read_metrics_log() if "tokens_per_second" in r]
    steps = train_records[-1]["step"] if train_records else 0
    tokens = train_records[-1]["tokens"] if train_records else 0
    training_seconds = train_records[-1]["elapsed"] if train_records else 0.0
    setup = folder.training_setup()
    tokenizer_table = markdown_table(
        ["script", "characters", "tokens", "characters/token", "bytes/token"],
        [
            [language, int(s["characters"]), int(s["tokens"]), s["chars_per_token"], s["bytes_per_token"]]
            if (s := stats.get(language))
            else [language, 0, 0, "—", "— (no such text in the validation split)"]
            for language in ("zh", "en")
        ],
    )
    return f"""# lmforge demo

Pretraining a {lm.model.num_parameters():,}-parameter decoder on `{data.source}` \
({len(valid_texts):,} validation paragraphs held out by hash).
{steps} steps, {tokens:,} training tokens in {training_seconds / 60:.1f} minutes \
({tokens / max(training_seconds, 1e-9):,.0f} tokens/s); the whole demo took {elapsed / 60:.1f} minutes.
Recipe: `{demo_recipe_path().name}` (saved in full as `{RunFolder.RECIPE}`). \
Precision: {setup.get("precision", "—")}; optimizer: {setup.get("optimizer", "—")}.

## Validation ({metrics["after"]["tokens"]:,} tokens)

{validation_table(metrics)}

## Tokenizer ({lm.tokenizer.vocab_size:,} tokens, byte-level BPE) on validation text

{tokenizer_table}"""


def _continuations(pairs: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"**{prompt}** → {prompt}{text}" for prompt, text in pairs)
