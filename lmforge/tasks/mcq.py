"""Multiple choice (CMMLU style), evaluation only: a decoder scores each choice by its log-likelihood.

This is lm-evaluation-harness's method: the prompt is the question, each choice
is a continuation, and the choice with the highest log P(choice | prompt) wins
(`accuracy`); `accuracy_norm` divides by the choice's length in characters so
long choices are not penalised for being long. The report puts both beside the
chance level and gives chance-centred accuracy, (acc - chance) / (1 - chance).
A record whose longest choice leaves the question too little of the model's
context is skipped, and the number skipped is reported (`skipped`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.config import option
from lmforge.errors import UserError
from lmforge.evaluate.metrics import choice_logprobs, mcq_accuracy
from lmforge.lm import load
from lmforge.models.decoder import Decoder
from lmforge.tasks.examples import TaskData, describe_split, report_folders, task_records, write_task_report

FIELDS = ("question", "choices", "answer")
LETTERS = "ABCDEFGH"
# A record is scored only if its longest choice leaves this many context tokens for the prompt's end
# (or the whole prompt, if shorter); otherwise it is skipped and counted in the report.
MIN_PROMPT_TOKENS = 16


@dataclass
class Recipe:
    data: TaskData = option(TaskData(source="../shared/data/mcq"), "{question, choices, answer} records")


def prompt_of(record: dict) -> str:
    subject = record.get("subject")
    header = f"以下是关于{subject}的单项选择题。\n" if subject else ""
    return f"{header}问题：{record['question']}\n答案："


def score_choices(lm, record: dict, context_length: int) -> list[float] | None:
    """log P(choice | prompt) for each choice, or None when the longest choice leaves the question no room.

    A long question loses its beginning (its end asks the question). A choice is never cut: scores over
    cut choices would compare different texts, so such a record is skipped and counted instead.
    """
    tokenizer = lm.tokenizer
    context = [tokenizer.bos_id, *tokenizer.encode(prompt_of(record))]
    choice_ids = [tokenizer.encode(str(choice)) or [tokenizer.unk_id] for choice in record["choices"]]
    room = context_length - max(len(ids) for ids in choice_ids)
    if room < min(MIN_PROMPT_TOKENS, len(context)):
        return None
    return choice_logprobs(lm.model, context[-room:], choice_ids)  # keep the end of a long question


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    if not isinstance(lm.model, Decoder):
        raise UserError(f"{model_dir} is not a decoder-only language model; mcq scores decoders")
    context_length = lm.model.config.max_position_embeddings
    records = task_records(data, split, FIELDS, key_field="question")
    correct, correct_norm, examples, skipped = [], [], [], 0
    num_choices = len(records[0]["choices"])
    for number, record in enumerate(tqdm(records, desc="mcq", disable=not progress), start=1):
        choices = record["choices"]
        valid_answer = record["answer"] in LETTERS[:num_choices]
        if not isinstance(choices, list) or len(choices) != num_choices or not valid_answer:
            raise UserError(
                f"record {number}: 'choices' must be a list of {num_choices} strings and 'answer' one of "
                f"{LETTERS[:num_choices]}"
            )
        scores = score_choices(lm, record, context_length)
        if scores is None:
            skipped += 1
            continue
        normalised = [score / max(len(str(choice)), 1) for score, choice in zip(scores, choices)]
        answer = LETTERS.index(record["answer"])
        picked = max(range(num_choices), key=scores.__getitem__)
        correct.append(picked == answer)
        correct_norm.append(max(range(num_choices), key=normalised.__getitem__) == answer)
        if len(examples) < 8:
            examples.append(
                {"question": record["question"][:50], "reference": record["answer"], "output": LETTERS[picked]}
            )
    skip_note = (
        f"{skipped} of {len(records)} records were skipped, not scored: a choice alone leaves fewer than "
        f"{MIN_PROMPT_TOKENS} of the model's {context_length} context tokens for the question. Accuracy is over "
        "the scored records only."
    )
    skip_note = [skip_note] if skipped else []
    if not correct:
        raise UserError(f"multiple choice: nothing to score in the {split} split; {skip_note[0]}")
    plain = mcq_accuracy(correct, num_choices)
    norm = mcq_accuracy(correct_norm, num_choices)
    metrics = {
        "task": "mcq",
        "split": split,
        "examples": len(correct),
        "skipped": skipped,
        "accuracy": plain["accuracy"],
        "centred_accuracy": plain["centred_accuracy"],
        "accuracy_norm": norm["accuracy"],
        "centred_accuracy_norm": norm["centred_accuracy"],
        "chance": plain["chance"],
    }
    write_task_report(
        out_dir,
        f"multiple choice — {model_dir}",
        metrics,
        [
            ("lmforge decoder, log-likelihood", plain),
            ("lmforge decoder, per-character log-likelihood", norm),
            ("chance", {"accuracy": plain["chance"], "centred_accuracy": 0.0}),
        ],
        [("accuracy", "accuracy"), ("centred_accuracy", "chance-centred accuracy")],
        examples,
        describe_split(data, split, "question"),
        ["Each choice is scored as a continuation of the question (lm-evaluation-harness's method).", *skip_note],
    )
    return metrics
