"""Extractive question answering: an encoder points at the answer's first and last token in the context.

The input is BERT's `<bos> question <eos> context <eos>` with segment ids 0/1;
with `question_match`, a context token in a pair of tokens the question also
holds gets segment 2 (after DrQA's exact-match feature,
https://arxiv.org/abs/1704.00051), so a small model need not first learn to
match question and context to find where the answer is. With `cloze_steps`, training starts with a phase on cloze
questions made from the training contexts (and `cloze_source`'s text): a clause
with a phrase replaced by "什么" asks for that phrase (`data/cloze.py`). The
report's baseline answers with the context clause sharing the most character
bigrams with the question.
A context longer than the window is read in overlapping windows; training uses
the windows that hold the whole answer, and prediction takes the best-scoring
span (start logit + end logit, at most `max_answer_tokens` long) over all
windows. Token offsets map the span back to the exact characters of the
context. Scores are exact match and F1 over characters, CMRC 2018 style.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.config import from_dict, option
from lmforge.data.cloze import clause_spans, cloze_questions
from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import evaluating, pick_device
from lmforge.errors import UserError
from lmforge.evaluate.metrics import qa_exact_match_f1
from lmforge.models import load_model
from lmforge.models.bert import load_encoder
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.encoding import model_folder
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import span_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("context", "question", "answers")


@dataclass
class Recipe:
    data: TaskData = option(TaskData(source="../shared/data/qa"), "SQuAD-style records")
    base: str | None = option(None, "encoder to start from: run folder, BERT folder or builtin:minilm (none = scratch)")
    vocab_size: int = option(8192, "tokenizer size when training from scratch")
    han_characters: bool = option(
        False, "scratch tokenizer: every Chinese character its own token boundary, so answer spans align"
    )
    question_match: bool = option(False, "context tokens in a token pair the question also holds get segment id 2")
    cloze_steps: int = option(0, "a first phase of this many steps on cloze questions made from the contexts")
    cloze_per_text: int = option(8, "cloze questions made from each context (and each cloze_source text)")
    cloze_source: str = option("", "more text for cloze questions (its train split), e.g. builtin:peoples-daily")
    cloze_share: float = option(0.0, "share of cloze windows among the real ones after the first phase, 0 to 0.9")
    model: EncoderConfig = option(EncoderConfig(head="span", num_layers=4), "encoder shape (scratch)")
    max_length: int = option(256, "tokens per window, question and markers included")
    stride: int = option(96, "context tokens between the starts of two windows")
    max_question_tokens: int = option(48, "longer questions are cut (and to half of max_length)")
    max_answer_tokens: int = option(32, "longest span considered at prediction")
    train: TrainConfig = option(
        TrainConfig(max_steps=800, batch_size=16, lr=3e-4, warmup_steps=80, eval_every=200, save_every=200),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class Window:
    input_ids: list[int]
    token_type_ids: list[int]
    context_start: int  # index of the first context token in input_ids
    offsets: list[tuple[int, int]]  # character span in the context of each context token


def windows_of(tokenizer: Tokenizer, question: str, context: str, recipe: Recipe) -> list[Window]:
    # A question never takes more than half the window, so a long one (a cloze clause) leaves room for context.
    question_ids = tokenizer.encode(question)[: min(recipe.max_question_tokens, recipe.max_length // 2)]
    context_ids, offsets = tokenizer.encode_with_offsets(context)
    budget = recipe.max_length - len(question_ids) - 3
    if budget < 8:
        raise UserError(f"max_length {recipe.max_length} leaves no room for the context after the question")
    prefix = [tokenizer.bos_id, *question_ids, tokenizer.eos_id]
    matched = question_matches(question_ids, context_ids) if recipe.question_match else [False] * len(context_ids)
    windows = []
    for start in range(0, max(len(context_ids), 1), min(recipe.stride, budget)):
        chunk = context_ids[start : start + budget]
        windows.append(
            Window(
                input_ids=[*prefix, *chunk, tokenizer.eos_id],
                token_type_ids=[0] * len(prefix) + [1 + match for match in matched[start : start + budget]] + [1],
                context_start=len(prefix),
                offsets=offsets[start : start + budget],
            )
        )
        if start + budget >= len(context_ids):
            break
    return windows


def question_matches(question_ids: list[int], context_ids: list[int]) -> list[bool]:
    """For each context token: does it begin or end a pair of tokens that also stands in the question?

    Pairs, not single tokens: with one token per Chinese character, "的" or "在" of the question would mark half
    the context, while a shared pair marks the phrase the question restates.
    """
    pairs = set(zip(question_ids, question_ids[1:]))
    shared = [pair in pairs for pair in zip(context_ids, context_ids[1:])]  # shared[k]: tokens k and k + 1
    return [(k > 0 and shared[k - 1]) or (k < len(shared) and shared[k]) for k in range(len(context_ids))]


def answer_tokens(window: Window, answer_start: int, answer_end: int) -> tuple[int, int] | None:
    """Input positions of the first and last token of the answer's characters, or None if not all inside."""
    first = last = None
    for index, (start, end) in enumerate(window.offsets):
        if first is None and end > answer_start:
            first = index
        if start < answer_end:
            last = index
    if first is None or last is None or window.offsets[first][0] > answer_start or window.offsets[last][1] < answer_end:
        return None
    return window.context_start + first, window.context_start + last


def training_examples(tokenizer: Tokenizer, records: list[dict], recipe: Recipe) -> list[tuple[Window, int, int]]:
    examples = []
    for number, record in enumerate(records, start=1):
        answer = record["answers"][0] if isinstance(record["answers"], list) and record["answers"] else None
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise UserError(f"record {number}: field 'answers' must be a list of {{text, answer_start}} objects")
        start = int(answer["answer_start"])
        end = start + len(answer["text"])
        if record["context"][start:end] != answer["text"]:
            raise UserError(f"record {number}: the answer text is not at answer_start {start} of its context")
        for window in windows_of(tokenizer, record["question"], record["context"], recipe):
            span = answer_tokens(window, start, end)
            if span is not None:
                examples.append((window, *span))
    return examples


def _pad(tokenizer: Tokenizer, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = tokenizer.pad([w.input_ids for w in windows], side="right")
    token_type_ids = torch.zeros_like(input_ids)
    for row, window in enumerate(windows):
        token_type_ids[row, : len(window.token_type_ids)] = torch.tensor(window.token_type_ids)
    return input_ids, attention_mask, token_type_ids


def _collate(tokenizer: Tokenizer, examples: list, rng) -> dict[str, torch.Tensor]:
    input_ids, attention_mask, token_type_ids = _pad(tokenizer, [window for window, _, _ in examples])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "starts": torch.tensor([start for _, start, _ in examples]),
        "ends": torch.tensor([end for _, _, end in examples]),
    }


def predict(
    model: Encoder,
    tokenizer: Tokenizer,
    questions: list[str],
    contexts: list[str],
    recipe: Recipe,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """The best span of each context: argmax of start + end logits over context tokens in every window."""
    device = next(model.parameters()).device
    best: list[tuple[float, str]] = [(float("-inf"), "")] * len(questions)
    flat = [
        (index, window)
        for index, (question, context) in enumerate(zip(questions, contexts))
        for window in windows_of(tokenizer, question, context, recipe)
    ]
    with evaluating(model):
        for chunk in tqdm(list(in_batches(flat, batch_size)), desc="qa", disable=not progress, leave=False):
            input_ids, attention_mask, token_type_ids = _pad(tokenizer, [window for _, window in chunk])
            logits = model(input_ids.to(device), attention_mask.to(device), token_type_ids.to(device))  # (B, T, 2)
            logits = logits.float().cpu()
            for row, (index, window) in enumerate(chunk):
                first, count = window.context_start, len(window.offsets)
                if count == 0:
                    continue
                starts = logits[row, first : first + count, 0]  # (C,)
                ends = logits[row, first : first + count, 1]
                scores = starts[:, None] + ends[None, :]  # (C, C): start i, end j
                allowed = torch.ones(count, count, dtype=torch.bool).triu().tril(recipe.max_answer_tokens - 1)
                scores = scores.masked_fill(~allowed, float("-inf"))
                flat_index = int(scores.argmax())
                i, j = divmod(flat_index, count)
                score = float(scores[i, j])
                if score > best[index][0]:
                    best[index] = (score, contexts[index][window.offsets[i][0] : window.offsets[j][1]])
    return [text for _, text in best]


def prepare(recipe: Recipe, setup: Setup) -> Training:
    train_records = task_records(recipe.data, "train", FIELDS, key_field="question")
    valid_records = task_records(recipe.data, "valid", FIELDS, key_field="question")[:200]
    if recipe.base:
        folder = model_folder(recipe.base)
        tokenizer = Tokenizer.load(folder)
        model = load_encoder(folder, head="span")
        if recipe.question_match:
            add_match_segment(model)
    else:

        def texts():
            return (text for record in train_records for text in (record["question"], record["context"]))

        tokenizer = setup.tokenizer(texts, recipe.vocab_size, han_characters=recipe.han_characters)
        recipe.model.vocab_size = tokenizer.vocab_size
        recipe.model.head = "span"
        recipe.model.type_vocab_size = max(recipe.model.type_vocab_size, 3 if recipe.question_match else 2)
        recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.max_length)
        torch.manual_seed(recipe.train.seed)
        model = Encoder(recipe.model)
    model.to(setup.device)
    recipe.max_length = min(recipe.max_length, model.config.max_position_embeddings)
    cloze = cloze_windows(tokenizer, train_records, recipe) if recipe.cloze_steps or recipe.cloze_share else []
    examples = training_examples(tokenizer, train_records, recipe)
    if recipe.cloze_share:
        # Cloze questions beside the real ones keep a few thousand questions from being learnt by heart.
        wanted = round(len(examples) * recipe.cloze_share / (1 - recipe.cloze_share))
        examples += random.Random(recipe.train.seed).sample(cloze, min(wanted, len(cloze)))
    print(
        f"span QA encoder: {model.num_parameters():,} parameters on {setup.device}; {len(examples):,} training windows"
    )
    collate = functools.partial(_collate, tokenizer)
    batches = ExampleBatches(examples, recipe.train.batch_size, collate, recipe.train.seed)

    def cloze_phase() -> None:
        print(f"cloze phase: {recipe.cloze_steps} steps on {len(cloze):,} windows of cloze questions")
        cloze_batches = ExampleBatches(cloze, recipe.train.batch_size, collate, recipe.train.seed)
        setup.first_phase(model, span_loss, cloze_batches.batch, recipe.train, recipe.cloze_steps)

    def validate(model: Encoder) -> dict[str, float]:
        predictions = predict(
            model, tokenizer, [r["question"] for r in valid_records], [r["context"] for r in valid_records], recipe
        )
        return qa_exact_match_f1(predictions, [answer_texts(r) for r in valid_records])

    return Training(
        model,
        tokenizer,
        batches.batch,
        validate,
        task_info={"task": "qa"},
        max_length=recipe.max_length,
        title=f"extractive QA on {recipe.data.source}",
        warm_up=cloze_phase if recipe.cloze_steps else None,
    )


def cloze_windows(tokenizer: Tokenizer, train_records: list[dict], recipe: Recipe) -> list[tuple[Window, int, int]]:
    """Training windows of cloze questions made from the training contexts and `cloze_source`'s train split (its
    validation and test text stay unseen)."""
    if not 0 <= recipe.cloze_share <= 0.9:
        raise UserError(f"cloze_share must be between 0 and 0.9, not {recipe.cloze_share}")
    texts = [*dict.fromkeys(r["context"] for r in train_records)]
    texts += [record_text(r) for r in read_split(recipe.cloze_source, "train")] if recipe.cloze_source else []
    return training_examples(tokenizer, cloze_questions(texts, recipe.cloze_per_text, recipe.train.seed), recipe)


def add_match_segment(model: Encoder) -> None:
    """Give a loaded encoder a third segment embedding, for context tokens found in the question.

    It starts as a copy of the context segment, so the model's first outputs are the base's; fine-tuning then
    learns what a match means.
    """
    old = model.embeddings.token_type_embeddings
    if old is None:
        raise UserError("question_match needs an encoder with segment embeddings (type_vocab_size 2 or more)")
    if old.num_embeddings >= 3:
        return
    new = torch.nn.Embedding(3, old.embedding_dim).to(old.weight.device)
    with torch.no_grad():
        new.weight[:2] = old.weight
        new.weight[2] = old.weight[1]
    model.embeddings.token_type_embeddings = new
    model.config.type_vocab_size = 3


def best_clause(question: str, context: str) -> str:
    """The baseline's answer: the context clause sharing the most character bigrams (then characters) with the
    question. It scores F1 20.9 on the CMRC 2018 validation split: most questions restate one clause."""
    bigrams = {question[i : i + 2] for i in range(len(question) - 1)}

    def overlap(span: tuple[int, int]) -> tuple[int, int]:
        clause = context[span[0] : span[1]]
        return sum(clause[i : i + 2] in bigrams for i in range(len(clause) - 1)), sum(c in question for c in clause)

    start, end = max(clause_spans(context), key=overlap, default=(0, len(context)))
    return context[start:end]


def answer_texts(record: dict) -> list[str]:
    return [answer["text"] for answer in record["answers"] if isinstance(answer, dict) and answer.get("text")]


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    model_dir, out_dir = report_folders(model_dir, out_dir)
    saved = RunFolder(model_dir).read_recipe(default={})
    recipe = from_dict(Recipe, saved) if saved else Recipe()
    model = load_model(model_dir, pick_device("auto"))
    tokenizer = Tokenizer.load(model_dir)
    records = task_records(data, split, FIELDS, key_field="question")
    references = [answer_texts(r) for r in records]
    predictions = predict(
        model, tokenizer, [r["question"] for r in records], [r["context"] for r in records], recipe, progress=progress
    )
    scores = qa_exact_match_f1(predictions, references)
    baseline = qa_exact_match_f1([best_clause(r["question"], r["context"]) for r in records], references)
    metrics = {"task": "qa", "split": split, "examples": len(records), **scores, "training_minutes": training_minutes,
               "baselines": {"best clause": baseline}}  # fmt: skip
    notes = [f"Fine-tuning took {training_minutes:.1f} minutes."] if training_minutes is not None else []
    write_task_report(
        out_dir,
        f"extractive QA — {model_dir}",
        metrics,
        [("lmforge encoder", scores), ("best clause (most bigrams shared with the question)", baseline)],
        [("exact_match", "exact match"), ("f1", "F1 (characters)")],
        [
            {"question": r["question"][:40], "reference": " / ".join(refs), "output": p}
            for r, refs, p in list(zip(records, references, predictions))[:8]
        ],
        describe_split(data, split, "question"),
        notes,
    )
    return metrics


TASK = Task(
    name="qa",
    Recipe=Recipe,
    fields=FIELDS,
    family="encoder",
    objective=span_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
