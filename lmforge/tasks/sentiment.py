"""Sentiment analysis: an encoder classifier on `{text, label}` records, with accuracy, macro-F1 and baselines.

Start from scratch (random init and a tokenizer trained on the task's text), from
a masked-LM-pretrained lmforge encoder (`lmforge pretrain --objective mlm`), or
from a pretrained BERT such as `builtin:minilm` — the classic BERT recipe:
keep the backbone, add a classification head, fine-tune everything. The report
sets the model beside two baselines on the same test split: the majority class
and snownlp's own naive Bayes sentiment classifier.
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm import tqdm

from lmforge.config import option
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import evaluating, pick_device
from lmforge.errors import UserError
from lmforge.evaluate.metrics import classification_metrics, plot_confusion_matrix
from lmforge.evaluate.report import markdown_table
from lmforge.explain.explain import strongest_tokens
from lmforge.models import load_model
from lmforge.models.bert import load_encoder
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.encoding import encode_single, model_folder, pad_right
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    baseline_cache_folder,
    cached_baseline,
    describe_split,
    fingerprint,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import classification_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("text", "label")
Baselines = Literal["all", "none"]


@dataclass
class Recipe:
    data: TaskData = option(TaskData(source="builtin:reviews"), "labelled text")
    base: str | None = option(None, "encoder to start from: run folder, BERT folder or builtin:minilm (none = scratch)")
    vocab_size: int = option(8192, "tokenizer size when training from scratch")
    model: EncoderConfig = option(
        EncoderConfig(head="classify", num_layers=4, hidden_size=256, intermediate_size=1024), "encoder shape (scratch)"
    )
    max_length: int = option(128, "tokens per text, <bos> and <eos> included")
    keep_tail: int = option(
        0, "a text longer than max_length keeps its last keep_tail tokens and its start, losing the middle (0: the end)"
    )
    first_phase_source: str = option(
        "", "more labelled text, same labels, trained on first (its train split only), e.g. builtin:reviews"
    )
    first_phase_steps: int = option(0, "steps of the first phase on first_phase_source")
    train: TrainConfig = option(
        TrainConfig(max_steps=600, batch_size=32, lr=1e-4, warmup_steps=60, eval_every=200, save_every=200),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    baselines: Baselines = option(
        "all", "all, or none to skip the report's baselines (snownlp's retrained Bayes takes minutes on a large split)"
    )
    labels: list[str] = field(default_factory=list)  # filled from the training data


def label_name(value) -> str:
    return str(value)


def prepare(recipe: Recipe, setup: Setup) -> Training:
    train_records = task_records(recipe.data, "train", FIELDS)
    valid_records = task_records(recipe.data, "valid", FIELDS)
    recipe.labels = sorted({label_name(record["label"]) for record in train_records})
    if len(recipe.labels) < 2:
        raise UserError(f"the training split of {recipe.data.source} has only the label {recipe.labels}; need two")
    model, tokenizer = _encoder(recipe, setup, train_records)
    recipe.max_length = min(recipe.max_length, model.config.max_position_embeddings)
    print(
        f"encoder classifier: {model.num_parameters():,} parameters on {setup.device}; {len(train_records):,} examples"
    )
    collate = functools.partial(_collate, tokenizer)
    batches = ExampleBatches(
        _examples(tokenizer, train_records, recipe), recipe.train.batch_size, collate, seed=recipe.train.seed
    )

    first_examples = _first_phase_examples(tokenizer, recipe) if recipe.first_phase_steps else []

    def first_phase() -> None:
        print(f"first phase: {recipe.first_phase_steps} steps on {len(first_examples):,} labelled texts")
        first = ExampleBatches(first_examples, recipe.train.batch_size, collate, recipe.train.seed)
        setup.first_phase(model, classification_loss, first.batch, recipe.train, recipe.first_phase_steps)

    valid_texts = [r["text"] for r in valid_records]
    valid_labels = [label_name(r["label"]) for r in valid_records]

    def validate(model: Encoder) -> dict[str, float]:
        predictions = predict(model, tokenizer, valid_texts, recipe.labels, recipe.max_length, recipe.keep_tail)
        scores = classification_metrics(predictions, valid_labels, recipe.labels)
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    return Training(
        model,
        tokenizer,
        batches.batch,
        validate,
        task_info={
            "task": "sentiment",
            "labels": recipe.labels,
            "max_length": recipe.max_length,
            "keep_tail": recipe.keep_tail,
        },
        max_length=recipe.max_length,
        title=f"sentiment on {recipe.data.source}",
        evaluate_options={"baselines": recipe.baselines},
        warm_up=first_phase if recipe.first_phase_steps else None,
    )


def _first_phase_examples(tokenizer: Tokenizer, recipe: Recipe) -> list[tuple[list[int], int]]:
    """The first phase's examples: `first_phase_source`'s train split, checked to use the task's labels."""
    if not recipe.first_phase_source:
        raise UserError("first_phase_steps needs first_phase_source: the labelled text to train on first")
    records = task_records(TaskData(source=recipe.first_phase_source), "train", FIELDS)
    unknown = {label_name(r["label"]) for r in records} - set(recipe.labels)
    if unknown:
        raise UserError(
            f"first_phase_source {recipe.first_phase_source} has labels {sorted(unknown)} that "
            f"{recipe.data.source} does not have ({', '.join(recipe.labels)})"
        )
    return _examples(tokenizer, records, recipe)


def _examples(tokenizer: Tokenizer, records: list[dict], recipe: Recipe) -> list[tuple[list[int], int]]:
    """(token ids, label index) per record."""
    label_index = {name: index for index, name in enumerate(recipe.labels)}
    texts = encode_single(tokenizer, [r["text"] for r in records], recipe.max_length, recipe.keep_tail)
    return list(zip(texts, (label_index[label_name(r["label"])] for r in records)))


def _encoder(recipe: Recipe, setup: Setup, train_records: list[dict]) -> tuple[Encoder, Tokenizer]:
    """The classifier and its tokenizer: a base encoder with a new head, or a new one (and tokenizer) from scratch."""
    if recipe.base:
        folder = model_folder(recipe.base)
        tokenizer = Tokenizer.load(folder)
        model = load_encoder(folder, head="classify", num_labels=len(recipe.labels), pooling=recipe.model.pooling)
    else:
        tokenizer = setup.tokenizer(lambda: (r["text"] for r in train_records), recipe.vocab_size)
        recipe.model.vocab_size = tokenizer.vocab_size
        recipe.model.num_labels = len(recipe.labels)
        recipe.model.head = "classify"
        torch.manual_seed(recipe.train.seed)
        model = Encoder(recipe.model)
    return model.to(setup.device), tokenizer


def _collate(tokenizer: Tokenizer, examples: list, rng) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right(tokenizer, [ids for ids, _ in examples])
    labels = torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def predict(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: list[str],
    labels: list[str],
    max_length: int,
    keep_tail: int = 0,
    batch_size: int = 64,
) -> list[str]:
    device = next(model.parameters()).device
    predictions = []
    # Sorting by length keeps padding, and so wasted work, small.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = encode_single(tokenizer, [texts[i] for i in order], max_length, keep_tail)
    with evaluating(model):
        for chunk in in_batches(rows, batch_size):
            input_ids, attention_mask = pad_right(tokenizer, chunk)
            logits = model(input_ids.to(device), attention_mask.to(device))  # (B, labels)
            predictions += [labels[i] for i in logits.argmax(-1).tolist()]
    unsorted = [""] * len(texts)
    for position, index in enumerate(order):
        unsorted[index] = predictions[position]
    return unsorted


def snownlp_bayes(
    texts: list[str], labels: list[str], train_records: list[dict] | None = None, progress: bool = True
) -> tuple[list[str], str] | None:
    """(predictions, what they cost) of snownlp's naive Bayes (P(positive) > 0.5 = "1"), for 0/1 labels only.

    With `train_records` it is retrained on them (word segmentation + Bayes, as snownlp trains its own model),
    otherwise it is the model shipped with snownlp. Pure Python, about 50 texts a second: the trained
    classifier (JSON, per training split) and its predictions (per split scored) are cached in the shared
    cache folder, so a second evaluation of the same splits costs nothing.
    """
    if sorted(labels) != ["0", "1"]:
        return None
    version = importlib.metadata.version("snownlp")
    trained_on = fingerprint([[r["text"], label_name(r["label"])] for r in train_records]) if train_records else None
    description = {
        "baseline": "snownlp naive Bayes",
        "snownlp": version,
        "train": trained_on,
        "texts": fingerprint(texts),
    }
    started = time.perf_counter()

    def classify() -> list[str]:
        from snownlp.sentiment import classifier as shipped

        model = shipped if train_records is None else _retrained_bayes(train_records, version, trained_on, progress)
        bar = tqdm(texts, desc=f"snownlp baseline: {len(texts):,} texts", disable=not progress, leave=False)
        return ["1" if model.classify(text) > 0.5 else "0" for text in bar]

    predictions, hit = cached_baseline(description, classify)
    cost = "from the cache" if hit else f"computed in {time.perf_counter() - started:.0f} s and cached"
    return predictions, cost


def _retrained_bayes(train_records: list[dict], version: str, trained_on: str, progress: bool):
    """snownlp's Sentiment classifier trained on `train_records`, or its cached state (JSON, never pickle)."""
    from snownlp.sentiment import Sentiment
    from snownlp.utils.frequency import AddOneProb

    def train() -> dict:
        classifier = Sentiment()
        negative = [r["text"] for r in train_records if label_name(r["label"]) == "0"]
        positive = [r["text"] for r in train_records if label_name(r["label"]) == "1"]
        # The bar stays: retraining is the slow part, and its rate and time show what the baseline costs.
        bar = tqdm(
            total=len(negative) + len(positive), unit=" texts", disable=not progress,
            desc="retraining snownlp Bayes baseline once per training split (cached; --baselines none skips it)",
        )  # fmt: skip

        def counted(texts: list[str]):
            for text in texts:
                yield text
                bar.update()

        classifier.train(counted(negative), counted(positive))
        bar.close()
        bayes = classifier.classifier
        return {"total": bayes.total, "classes": {name: vars(counts) for name, counts in bayes.d.items()}}

    state, _ = cached_baseline(
        {"baseline": "snownlp naive Bayes state", "snownlp": version, "train": trained_on}, train
    )
    classifier = Sentiment()
    classifier.classifier.total = state["total"]
    for name, counts in state["classes"].items():
        classifier.classifier.d[name] = AddOneProb()
        vars(classifier.classifier.d[name]).update(counts)
    return classifier


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    baselines: Baselines = "all",
) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of a fine-tuned classifier, beside the baselines (or none)."""
    if baselines not in get_args(Baselines):
        raise UserError(f"baselines must be one of {', '.join(get_args(Baselines))}, not '{baselines}'")
    model_dir, out_dir = report_folders(model_dir, out_dir)
    task = RunFolder(model_dir).read_task()
    labels = task["labels"]
    model = load_model(model_dir, pick_device("auto"))
    tokenizer = Tokenizer.load(model_dir)
    records = task_records(data, split, FIELDS)
    texts = [r["text"] for r in records]
    truth = [label_name(r["label"]) for r in records]
    unseen = sorted(set(truth) - set(labels))
    if unseen:
        raise UserError(f"labels {unseen} in the {split} split were never seen in training (known: {labels})")
    cut = (task["max_length"], task.get("keep_tail", 0))  # runs made before keep_tail cut the end
    predictions = predict(model, tokenizer, texts, labels, *cut)
    scores = classification_metrics(predictions, truth, labels)
    plot_confusion_matrix(scores["confusion_matrix"], labels, out_dir / "confusion_matrix.png", title="sentiment")

    rows = [("lmforge encoder", scores)]
    if baselines == "all":
        baseline_rows, notes = _baselines(model_dir, texts, truth, labels, progress)
        rows += baseline_rows
    else:
        notes = ["Baselines were skipped (`--baselines none`)."]
    metrics = {
        "task": "sentiment",
        "split": split,
        "examples": len(records),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "confusion_matrix": scores["confusion_matrix"],
        "labels": labels,
        "baselines": {name: {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"]} for name, s in rows[1:]},
        "baselines_skipped": baselines == "none",
        "training_minutes": training_minutes,
    }
    notes.insert(
        0, "Confusion matrix (rows = true label, columns = predicted): ![confusion matrix](confusion_matrix.png)"
    )
    notes.append(_explained_examples(model, tokenizer, texts, predictions, labels, *cut))
    if training_minutes is not None:
        notes.insert(0, f"Fine-tuning took {training_minutes:.1f} minutes.")
    write_task_report(
        out_dir,
        f"sentiment — {model_dir}",
        metrics,
        rows,
        [("accuracy", "accuracy"), ("macro_f1", "macro-F1")],
        [{"text": t[:60], "reference": y, "output": p} for t, y, p in list(zip(texts, truth, predictions))[:8]],
        describe_split(data, split, "text"),
        notes,
    )
    return metrics


EXPLAINED_PER_LABEL = 2  # test examples per predicted label whose decisive words the report shows


def _explained_examples(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: list[str],
    predictions: list[str],
    labels: list[str],
    max_length: int,
    keep_tail: int,
) -> str:
    """A Markdown section: for the first test texts predicted as each label, the words that pushed the model toward
    its prediction and against it (integrated gradients, 32 steps)."""
    chosen = [
        index
        for label in labels
        for index in [i for i, p in enumerate(predictions) if p == label][:EXPLAINED_PER_LABEL]
    ]
    if not chosen:
        return ""
    rows = encode_single(tokenizer, [texts[i] for i in chosen], max_length, keep_tail)
    found = strongest_tokens(model, tokenizer, rows, [labels.index(predictions[i]) for i in chosen])

    def words(pairs: list[tuple[str, float]]) -> str:
        return ", ".join(f"{token.strip() or repr(token)} ({value:+.3f})" for token, value in pairs) or "-"

    table = markdown_table(
        ["text", "predicted", "words for the prediction", "words against it"],
        [[texts[i][:60], predictions[i], words(f["for"]), words(f["against"])] for i, f in zip(chosen, found)],
    )
    command = "lmforge explain --model RUN TEXT"
    return (
        "\n## Explained examples\n\nThe strongest words for and against each prediction, by integrated gradients "
        f"of the predicted label's log-probability (32 steps); `{command}` draws any text's attributions and "
        f"attention.\n\n{table}\n"
    )


def _baselines(
    model_dir: Path, texts: list[str], truth: list[str], labels: list[str], progress: bool
) -> tuple[list[tuple[str, dict]], list[str]]:
    """(name, scores) of the majority class and snownlp's Bayes (shipped, retrained), and the report's notes."""
    train_records = _training_records(model_dir)
    majority = _majority_label(train_records, labels)
    rows = [(f"majority class ({majority})", classification_metrics([majority] * len(truth), truth, labels))]
    shipped = snownlp_bayes(texts, labels, progress=progress)
    if shipped is None:
        return rows, []
    rows.append(("snownlp naive Bayes, shipped model", classification_metrics(shipped[0], truth, labels)))
    costs = [f"shipped model: {shipped[1]}"]
    if train_records:
        retrained, cost = snownlp_bayes(texts, labels, train_records, progress)
        rows.append(
            ("snownlp naive Bayes, retrained on this train split", classification_metrics(retrained, truth, labels))
        )
        costs.append(f"retrained: {cost}")
    notes = [
        "snownlp's shipped Bayes model was trained on snownlp's own review files, so on `builtin:reviews` it has "
        "seen the test texts: an optimistic baseline. The retrained one learns from this run's train split only.",
        f"snownlp baselines: {'; '.join(costs)} (cache: {baseline_cache_folder()}; `--baselines none` skips them).",
    ]
    return rows, notes


def _training_records(model_dir: Path) -> list[dict]:
    """The training split the model was fine-tuned on, as its recipe.json records it (none if unknown)."""
    recipe = RunFolder(model_dir).read_recipe(default={})
    return task_records(TaskData(**recipe["data"]), "train", FIELDS) if "data" in recipe else []


def _majority_label(train_records: list[dict], labels: list[str]) -> str:
    counts = {label: 0 for label in labels}
    for record in train_records:
        counts[label_name(record["label"])] += 1
    return max(counts, key=counts.get)


TASK = Task(
    name="sentiment",
    Recipe=Recipe,
    fields=FIELDS,
    family="encoder",
    objective=classification_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
