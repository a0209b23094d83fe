"""Translation between Chinese and English: an encoder-decoder on `{src, tgt}` pairs, scored by BLEU and chrF.

The data's `src` is Chinese and `tgt` English (`../shared/data/translation`,
Tatoeba); `direction: en-zh` swaps the two. BLEU uses sacrebleu's `zh`
tokenizer for Chinese targets and `13a` for English ones (and sentence chrF is
the utility of MBR decoding, when a recipe turns it on). The report sets
greedy and beam-search decoding beside the trivial baseline that copies the
source, which scores above zero only through shared names, numbers and
punctuation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import option
from lmforge.evaluate.metrics import bleu_chrf, chrf, paired_bleu_chrf
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.examples import TaskData
from lmforge.tasks.text_to_text import Score, Scoring, TextToTextRecipe, evaluate_text_to_text, prepare_text_to_text
from lmforge.train.objectives import seq2seq_loss

COLUMNS = [("bleu", "BLEU"), ("chrf", "chrF")]


@dataclass
class Recipe(TextToTextRecipe):
    data: TaskData = option(TaskData(source="../shared/data/translation"), "{src: Chinese, tgt: English} pairs")
    direction: Literal["zh-en", "en-zh"] = option("zh-en", "zh-en translates src to tgt; en-zh tgt to src")


def task_info(direction: str) -> dict:
    """What task.json records: which field is read and which written, and the target language."""
    source_lang, target_lang = direction.split("-")
    fields = {"zh": "src", "en": "tgt"}
    return {
        "task": "translate",
        "direction": direction,
        "source_field": fields[source_lang],
        "target_field": fields[target_lang],
        "target_lang": target_lang,
    }


def scorer(target_lang: str) -> Score:
    def score(hypotheses: list[str], references: list[str]) -> dict:
        return bleu_chrf(hypotheses, references, target_lang)

    return score


def prepare(recipe: Recipe, setup: Setup) -> Training:
    task = task_info(recipe.direction)
    return prepare_text_to_text(recipe, setup, task, scorer(task["target_lang"]))


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    **decoding,
) -> dict:
    """BLEU and chrF of greedy, beam-search (and MBR) translations of a split, beside copying the source, each
    baseline with sacrebleu's paired bootstrap test against the last decoding.

    decoding: num_beams, length_penalty, no_repeat_ngram_size or mbr_samples instead of the run's task.json;
    compare: another translate run as one more baseline (e.g. the same recipe from scratch beside a --base run).
    """
    target_lang = RunFolder(model_dir).read_task().get("target_lang", "en")
    notes = [
        f"BLEU: sacrebleu, tokenizer {'zh' if target_lang == 'zh' else '13a'}; chrF: sacrebleu defaults.",
        "Baseline 'copy the source' outputs the untranslated source sentence.",
    ]
    scoring = Scoring(
        score=scorer(target_lang),
        columns=COLUMNS,
        baselines={"copy the source": lambda sources: list(sources)},
        notes=notes,
        utility=chrf,
        paired=lambda ours, theirs, references: paired_bleu_chrf(ours, theirs, references, target_lang),
    )
    return evaluate_text_to_text(
        "translate", model_dir, data, split, out_dir, scoring, training_minutes, progress, **decoding
    )


TASK = Task(
    name="translate",
    Recipe=Recipe,
    fields=("src", "tgt"),
    family="seq2seq",
    objective=seq2seq_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
