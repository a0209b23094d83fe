"""Writing with control over form and style: a pretrained decoder fine-tuned to write poems and news to a prompt.

Data: the Tang poems of chinese-poetry in `../shared/data/pretrain` (rows whose `source` is 全唐诗; a regulated
form is read from the lines, data/poetry.py), news read in reverse from a `{document, summary}` folder (`news`:
the headline is the prompt, the post the text), and any `{title, text}` or `{prompt, text}` JSON Lines. The prompt
spells the controls: the title, and the form for a poem, or the register (现代 / 文言) and a target length for
prose. Only the text after the prompt carries loss. The report scores sampled poems with the form constraint
(generate/constraints.py) and without it, beside the base model, a random training poem of the same form and the
prompt copied: form accuracy, rhyme rate, distinct-n, repeated 4-grams and perplexity under the base model; news
gets character ROUGE-L against the reference. Seeds and sampling settings are recorded, with a gallery.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import option
from lmforge.data.instructions import first_sentence
from lmforge.data.poetry import Form, form_named, form_of, rhymes, split_poem
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.metrics import choice_logprobs, distinct_n, repeated_ngram_share, rouge_per_example
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import LM, load
from lmforge.models import load_model
from lmforge.models.decoder import Decoder
from lmforge.models.lora import LoRAConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.chat import assistant_loss, linked_model, pack_shuffled, pick_rows, tuned_task_info
from lmforge.tasks.examples import ExampleBatches, TaskData, in_batches, report_folders, task_records, write_task_report
from lmforge.train.objectives import chat_sft_loss
from lmforge.train.trainer import TrainConfig

POEM_SOURCE = "chinese-poetry/全唐诗"
STYLES = ("现代", "文言")
VALID_ROWS = 32
COLUMNS = [
    ("form_accuracy", "form accuracy"),
    ("line_count_accuracy", "line count"),
    ("line_length_accuracy", "characters per line"),
    ("rhyme_rate", "rhyme rate"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repeated_4grams", "repeated 4-grams"),
    ("base_perplexity", "perplexity under the base model"),
]
HALF_LINE = re.compile("[，。]")
MIN_PROSE = 20  # characters a People's Daily paragraph must have after its opening to be written


@dataclass
class Recipe:
    data: TaskData = option(
        TaskData(source="../shared/data/pretrain", max_train_examples=0, max_eval_examples=60),
        "poems (chinese-poetry rows of a pretrain folder) or {title|prompt, text} JSON Lines",
    )
    news: str | None = option(None, "a {document, summary} folder read in reverse (headline -> post), e.g. "
                                    "../shared/data/summarization")  # fmt: skip
    max_news_examples: int = option(2000, "news training examples at most (0 = all)")
    peoples_daily: int = option(
        0,
        "People's Daily paragraphs (the built-in news) added as modern prose, at most this many for training "
        "(0 = none): the opening is given, the rest written",
    )
    base: str | None = option(None, "the pretrained decoder (run folder) to fine-tune")
    max_length: int = option(0, "tokens per training sequence (0 = the base model's context)")
    lora: LoRAConfig = option(LoRAConfig(), "low-rank adapters; rank 0 trains every weight")
    train: TrainConfig = option(
        TrainConfig(max_steps=300, batch_size=8, lr=5e-4, warmup_steps=20, eval_every=100, save_every=100),
        "optimisation",
    )
    generation: SamplingConfig = option(
        SamplingConfig(max_new_tokens=120, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0),
        "sampling settings of the evaluation (recorded in metrics.json) and saved with the model",
    )
    rhyme: bool = option(True, "the constrained poems rhyme on the even lines")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


def writing_examples(
    data: TaskData, split: str, news: str | None = None, max_news: int = 0, peoples_daily: int = 0
) -> list[dict]:
    """{kind: poem|prose, title, text, form or style} of one split: regulated Tang poems, user prose, news read
    from headline to post, and People's Daily paragraphs from their opening (`opening`: the title is the text's
    first words)."""
    examples = []
    for record in task_records(data, split, ("text",), key_field="text"):
        if record.get("source") == POEM_SOURCE:
            title, body = split_poem(record["text"])
            form = form_of(body)
            if form is not None and title:
                examples.append({"kind": "poem", "title": title, "form": form.name, "text": body})
        elif record.get("title") or record.get("prompt"):
            style = record.get("style", STYLES[0])
            if style not in STYLES:
                raise UserError(f"style '{style}' of a record of {data.source} is not one of {', '.join(STYLES)}")
            title = record.get("title") or record["prompt"]
            examples.append({"kind": "prose", "title": title, "style": style, "text": record["text"]})
    if news:
        rows = task_records(TaskData(source=news), split, ("document", "summary"))
        rows = rows[:max_news] if max_news and split == "train" else rows
        examples += [{"kind": "prose", "title": r["summary"], "style": STYLES[0], "text": r["document"]} for r in rows]
    if peoples_daily:
        fractions = {"valid_fraction": data.valid_fraction, "test_fraction": data.test_fraction}
        rows = task_records(TaskData(source="builtin:peoples-daily", **fractions), split, ("text",))
        openings = [e for e in map(opening_example, rows) if e is not None]
        examples += openings[:peoples_daily] if split == "train" else openings
    if not examples:
        raise UserError(f"no writing example in the {split} split of {data.source}: it needs chinese-poetry rows "
                        f"(source {POEM_SOURCE}) of a regulated form, or {{title, text}} records")  # fmt: skip
    return examples


def opening_example(record: dict) -> dict | None:
    """A paragraph as prose to go on with: its first sentence (at most 30 characters) given, the rest to write."""
    opening = first_sentence(record["text"])
    rest = record["text"][len(opening) :].strip()
    if len(opening) < 4 or len(rest) < MIN_PROSE:
        return None
    return {"kind": "prose", "title": opening, "style": STYLES[0], "text": rest, "opening": True}


def target_length(text: str) -> int:
    """The length a prose prompt asks for: the reference's characters, rounded to 20 (at least 10)."""
    return max(10, round(len(text) / 20) * 20)


def prompt_for(example: dict) -> str:
    """The controls as text: title (or opening), then the form (poems) or the register and a target length (prose)."""
    if example["kind"] == "poem":
        return f"题目：{example['title']}\n体裁：{example['form']}\n正文：\n"
    heading = "开头" if example.get("opening") else "标题"
    length = target_length(example["text"])
    return f"{heading}：{example['title']}\n文体：{example['style']}\n字数：约{length}字\n正文：\n"


def encode_examples(tokenizer: Tokenizer, examples: list[dict], length: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) per example: `<bos> prompt text <eos>`, loss on the text and `<eos>`, cut to `length`."""
    documents = []
    for example in examples:
        prompt = [tokenizer.bos_id, *tokenizer.encode(prompt_for(example))]
        text = [*tokenizer.encode(example["text"]), tokenizer.eos_id]
        ids = (prompt + text)[:length]
        if len(ids) > len(prompt):
            documents.append((ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt))))
    return documents


def _rows(tokenizer: Tokenizer, examples: list[dict], length: int, seed: int) -> dict[str, torch.Tensor]:
    return pack_shuffled(encode_examples(tokenizer, examples, length), length, tokenizer.pad_id, seed)


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """`recipe.base` and packed rows of prompt + text, loss on the text."""
    if not recipe.base:
        raise UserError("writing fine-tunes a pretrained decoder: --base RUN_FOLDER (e.g. runs/demo)")
    model = load_model(recipe.base, setup.device)
    if not isinstance(model, Decoder):
        raise UserError(f"{recipe.base} is not a decoder; the write task needs one (e.g. lmforge demo's run)")
    tokenizer = Tokenizer.load(recipe.base)
    context = model.config.max_position_embeddings
    length = min(recipe.max_length or context, context)
    seed = recipe.train.seed
    train = writing_examples(recipe.data, "train", recipe.news, recipe.max_news_examples, recipe.peoples_daily)
    rows = _rows(tokenizer, train, length, seed)
    valid = writing_examples(recipe.data, "valid", recipe.news, peoples_daily=recipe.peoples_daily)
    valid_rows = _rows(tokenizer, valid, length, seed)
    valid_rows = {name: tensor[:VALID_ROWS] for name, tensor in valid_rows.items()}
    kinds = {kind: sum(e["kind"] == kind for e in train) for kind in ("poem", "prose")}
    task = {"task": "write", "base": str(recipe.base), "training_examples": kinds, "news": recipe.news,
            "peoples_daily": recipe.peoples_daily, "rhyme": recipe.rhyme}  # fmt: skip
    task_info = tuned_task_info(model, recipe.lora, task, seed)
    print(f"write: {kinds['poem']:,} poems and {kinds['prose']:,} prose texts in {len(rows['input_ids']):,} rows")

    return Training(
        model,
        tokenizer,
        ExampleBatches(range(len(rows["input_ids"])), recipe.train.batch_size, pick_rows(rows), seed).batch,
        lambda model: assistant_loss(model, valid_rows),
        task_info,
        max_length=context,
        title=f"writing on {recipe.data.source}",
        generation=recipe.generation,
        lora=recipe.lora if recipe.lora.enabled else None,
        evaluate_options={
            "news": recipe.news,
            "peoples_daily": recipe.peoples_daily,
            "rhyme": recipe.rhyme,
            "sampling": dataclasses.asdict(recipe.generation),
        },
    )


def form_scores(outputs: list[str], forms: list[Form]) -> dict[str, float]:
    """Form accuracy (the exact form), line count and characters-per-line accuracy, and the rhyme rate."""
    count = length = exact = rhyme = 0
    for output, form in zip(outputs, forms):
        body = output.strip()
        lines = [half for row in body.split("\n") for half in HALF_LINE.split(row) if half]
        count += len(lines) == form.line_count
        length += bool(lines) and all(len(line) == form.line_length for line in lines)
        exact += form_of(body) == form
        rhyme += bool(rhymes(body)) if form_of(body) is not None else False
    total = max(len(outputs), 1)
    return {"form_accuracy": exact / total, "line_count_accuracy": count / total,
            "line_length_accuracy": length / total, "rhyme_rate": rhyme / total}  # fmt: skip


def text_scores(outputs: list[str], base: LM | None) -> dict[str, float]:
    scores = {"distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2),
              "repeated_4grams": repeated_ngram_share(outputs, 4)}  # fmt: skip
    if base is not None:
        scores["base_perplexity"] = output_perplexity(base, outputs)
    return scores


def output_perplexity(lm: LM, texts: list[str]) -> float:
    """exp(mean negative log-likelihood per token) of the texts under `lm`, each after `<bos>` alone."""
    context = lm.model.config.max_position_embeddings - 1
    encoded = [ids[:context] for ids in lm.tokenizer.encode_batch([t for t in texts if t.strip()])]
    if not encoded:
        return float("nan")
    total = sum(sum(choice_logprobs(lm.model, [lm.tokenizer.bos_id], chunk)) for chunk in in_batches(encoded, 16))
    return math.exp(-total / sum(len(ids) for ids in encoded))


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    news: str | None = None,
    peoples_daily: int = 0,
    rhyme: bool = True,
    sampling: dict | None = None,
) -> dict:
    """Poems with and without the form constraint and news, beside the base model and the copy baselines."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    settings = {**dataclasses.asdict(lm.defaults), **(sampling or {})}
    settings["seed"] = 0 if settings.get("seed") is None else settings["seed"]
    base_dir = linked_model(RunFolder(model_dir).read_task(default={}))
    base = load(base_dir) if base_dir else None
    # The example limit applies to poems and to prose, not to the records they are read from.
    examples = writing_examples(dataclasses.replace(data, max_eval_examples=0), split, news, 0, peoples_daily)
    poems = _sample([e for e in examples if e["kind"] == "poem"], data.max_eval_examples or 60)
    training = [e for e in writing_examples(data, "train") if e["kind"] == "poem"] if poems else []
    systems, gallery = score_poems(lm, base, poems, training, settings, rhyme) if poems else ({}, [])
    prose = _sample([e for e in examples if e["kind"] == "prose"], min(data.max_eval_examples or 60, 60))
    if prose:
        systems = merge_prose(systems, score_prose(lm, base, prose, settings))
    rows = list(systems.items())
    metrics = {**rows[0][1], "poems": len(poems), "prose": len(prose), "sampling": settings,
               "baselines": dict(rows[1:])}  # fmt: skip
    columns = COLUMNS + ([("rougeL", "prose ROUGE-L"), ("length_error", "prose length off target")] if prose else [])
    notes = [
        f"Sampling: {settings} (seed recorded; the same settings for every system that samples). Form accuracy: the "
        "output is exactly the asked form (line count, characters per line, ，/。 marks); rhyme rate: outputs of a "
        "regulated form whose even lines all end in one rhyme group (pinyin finals without the medial, via "
        "pypinyin: a modern approximation of the classical rhyme tables). Perplexity: of the output under the "
        "base model. Prose ROUGE-L: characters, against the reference text; length off target: the mean of "
        "|characters written - characters asked| / characters asked.",
    ]
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(f"Fine-tuning took {training_minutes:.1f} minutes. Training curve: ![loss]({RunFolder.LOSS_PLOT})")
    write_task_report(out_dir, f"writing — {model_dir}", metrics, rows, columns, gallery,
                      f"{data.source} ({split} split){f' and {news}' if news else ''}", notes)  # fmt: skip
    return metrics


def _sample(examples: list[dict], count: int) -> list[dict]:
    if len(examples) <= count:
        return examples
    keep = np.sort(np.random.default_rng(0).permutation(len(examples))[:count])
    return [examples[i] for i in keep]


def score_poems(lm: LM, base: LM | None, poems: list[dict], training: list[dict], settings: dict, rhyme: bool):
    """{system: scores} for the poems and a gallery of the constrained ones."""
    forms = [form_named(p["form"]) for p in poems]
    prompts = [prompt_for(p) for p in poems]
    by_form: dict[str, list[str]] = {}
    for example in training:
        by_form.setdefault(example["form"], []).append(example["text"])
    rng = np.random.default_rng(settings["seed"])
    random_poems = [_pick(by_form.get(p["form"], [p["text"]]), rng) for p in poems]
    outputs = {"constrained": [""] * len(poems), "free": lm.generate(prompts, **settings)}
    for name in sorted({p["form"] for p in poems}):  # one constraint per form
        rows = [i for i, p in enumerate(poems) if p["form"] == name]
        texts = lm.generate([prompts[i] for i in rows], constraint=lm.form_constraint(name, rhyme), **settings)
        for i, text in zip(rows, texts):
            outputs["constrained"][i] = text
    systems = {"model + form constraint": outputs["constrained"], "model without constraint": outputs["free"]}
    if base is not None:
        systems["base model without constraint"] = base.generate(prompts, **settings)
    systems["random training poem of the same form"] = random_poems
    systems["prompt copied"] = [p["title"] for p in poems]
    scored = {name: {**form_scores(texts, forms), **text_scores(texts, base)} for name, texts in systems.items()}
    gallery = [
        {
            "title": p["title"],
            "form": p["form"],
            "output": out.replace("\n", " "),
            "reference": p["text"].replace("\n", " "),
        }
        for p, out in zip(poems[:8], outputs["constrained"])
    ]
    return scored, gallery


def _pick(texts: list[str], rng: np.random.Generator) -> str:
    return texts[int(rng.integers(len(texts)))]


def score_prose(lm: LM, base: LM | None, prose: list[dict], settings: dict) -> dict[str, dict[str, float]]:
    """Character ROUGE-L of prose written from its headline or opening, and how far its length is from the one
    asked, beside copying the headline."""
    prompts = [prompt_for(e) for e in prose]
    references = [e["text"] for e in prose]
    systems = {"model without constraint": lm.generate(prompts, **settings)}
    if base is not None:
        systems["base model without constraint"] = base.generate(prompts, **settings)
    systems["prompt copied"] = [e["title"] for e in prose]
    return {
        name: {
            "rougeL": float(np.mean(rouge_per_example(texts, references)["rougeL"])),
            "length_error": length_error(texts, references),
        }
        for name, texts in systems.items()
    }


def length_error(texts: list[str], references: list[str]) -> float:
    """Mean |characters written - characters asked| / characters asked, asked as the prompt asks (`target_length`)."""
    asked = np.array([target_length(reference) for reference in references])
    written = np.array([len(text.strip()) for text in texts])
    return float(np.mean(np.abs(written - asked) / asked))


def merge_prose(systems: dict[str, dict], prose: dict[str, dict]) -> dict[str, dict]:
    merged = {name: dict(values) for name, values in systems.items()}
    for name, values in prose.items():
        merged.setdefault(name, {}).update(values)
    return merged


TASK = Task(
    name="write",
    Recipe=Recipe,
    fields=("text",),
    family="decoder",
    objective=chat_sft_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
