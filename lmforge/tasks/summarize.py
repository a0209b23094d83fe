"""Summarization: an encoder-decoder writes a headline for a short text (`{document, summary}`), scored by ROUGE.

The default data is LCSTS (`../shared/data/summarization`): Weibo news posts of
77-152 characters and their headlines of at most 30. ROUGE-1/2/L F1 are
computed on Chinese characters and alphanumeric words
(`lmforge.evaluate.metrics.rouge`). The report sets greedy, beam-search and
minimum-Bayes-risk decoding (ROUGE-L as the utility) beside the "lead"
baseline: the document's first sentence, cut to 30 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import option
from lmforge.data.sources import read_split, record_text
from lmforge.evaluate.metrics import rouge, rouge_l, rouge_per_example
from lmforge.generate.mbr import Symmetric
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.examples import TaskData
from lmforge.tasks.text_to_text import Scoring, TextToTextRecipe, evaluate_text_to_text, prepare_text_to_text
from lmforge.train.objectives import seq2seq_loss

TASK_INFO = {"task": "summarize", "source_field": "document", "target_field": "summary"}
COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")]
LEAD_CHARACTERS = 30  # the longest LCSTS headline
SENTENCE_END = re.compile(r"[。！？!?]")


@dataclass
class Recipe(TextToTextRecipe):
    data: TaskData = option(TaskData(source="../shared/data/summarization"), "{document, summary} pairs")
    max_source_length: int = option(160, "document tokens, <bos> and <eos> included; longer documents are cut")
    max_target_length: int = option(40, "summary tokens plus one (<bos> or <eos>); also the generation limit")
    lead_pretraining_steps: int = option(
        0, "first phase: steps learning to write each training document's lead from the rest of it (0 = off)"
    )
    lead_pretraining_source: str = option("", "more unlabelled news for the first phase, e.g. builtin:peoples-daily")


def lead(document: str, max_characters: int = LEAD_CHARACTERS) -> str:
    """The document's first sentence (through the first 。！？!?), cut to `max_characters`."""
    end = SENTENCE_END.search(document)
    return document[: end.end() if end else len(document)][:max_characters]


def lead_bias_pairs(documents: list[str]) -> tuple[list[str], list[str]]:
    """(rest of the document, its lead sentence) for every training document with text after its lead.

    News puts the gist first, so predicting the lead from the rest is free summarization practice on unlabelled
    text (Zhu et al., "Leveraging Lead Bias for Zero-shot Abstractive News Summarization",
    https://arxiv.org/abs/1912.11602). The lead is removed from the source, so copying it is impossible.
    """
    sources, targets = [], []
    for document in documents:
        first = lead(document, max_characters=len(document))
        rest = document[len(first) :].strip()
        if len(rest) >= 10 and len(first) >= 4:
            sources.append(rest)
            targets.append(first[:LEAD_CHARACTERS])
    return sources, targets


def prepare(recipe: Recipe, setup: Setup) -> Training:
    extra = recipe.lead_pretraining_source

    def warm_up_pairs(documents: list[str]) -> tuple[list[str], list[str]]:
        # Only the training split of an extra source: its validation and test text stay unseen.
        more = [record_text(r) for r in read_split(extra, "train")] if extra else []
        return lead_bias_pairs(documents + more)

    return prepare_text_to_text(
        recipe, setup, TASK_INFO, rouge, warm_up_pairs=warm_up_pairs, warm_up_steps=recipe.lead_pretraining_steps
    )


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    **decoding,
) -> dict:
    """ROUGE-1/2/L of greedy, beam-search and MBR summaries of a split, beside the lead baseline.

    decoding: num_beams, length_penalty, no_repeat_ngram_size or mbr_samples instead of the run's task.json.
    """
    notes = [
        "ROUGE F1 on Chinese characters and alphanumeric words (punctuation dropped), averaged over examples.",
        f"Baseline 'lead' is the document's first sentence (up to the first 。！？!?), cut to {LEAD_CHARACTERS} "
        "characters.",
    ]
    scoring = Scoring(
        score=rouge,
        columns=COLUMNS,
        baselines={"lead": lambda documents: [lead(document) for document in documents]},
        notes=notes,
        utility=Symmetric(rouge_l),  # F1 is symmetric: MBR scores each pair of samples once
        per_example=rouge_per_example,
    )
    return evaluate_text_to_text(
        "summarize", model_dir, data, split, out_dir, scoring, training_minutes, progress, **decoding
    )


TASK = Task(
    name="summarize",
    Recipe=Recipe,
    fields=("document", "summary"),
    family="seq2seq",
    objective=seq2seq_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
