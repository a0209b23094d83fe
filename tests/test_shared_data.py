"""The task readers on the real data sets in ../shared/data (skipped where that folder is absent)."""

from pathlib import Path

import pytest

from lmforge.data.tokenizer import Tokenizer
from lmforge.tasks import mcq, qa, sentiment
from lmforge.tasks.examples import TaskData, task_records
from lmforge.tasks.text_to_text import text_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (the shared data sets) is not on this machine")


def data(task: str) -> TaskData:
    return TaskData(source=str(SHARED / task))


def test_sentiment_splits_have_both_labels():
    for split in ("train", "valid", "test"):
        labels = {sentiment.label_name(r["label"]) for r in task_records(data("sentiment"), split, sentiment.FIELDS)}
        assert labels == {"0", "1"}


def test_translation_and_summarization_pairs_read_in_both_directions():
    sources, targets = text_pairs(data("translation"), "valid", "src", "tgt")
    assert len(sources) == len(targets) > 1000
    assert any("\u4e00" <= char <= "\u9fff" for char in sources[0])  # zh -> en by default
    documents, summaries = text_pairs(data("summarization"), "valid", "document", "summary")
    assert len(documents) == 1000 and max(map(len, summaries)) < min(map(len, documents))


def test_qa_answers_map_onto_tokens_for_nearly_every_question():
    records = task_records(data("qa"), "valid", qa.FIELDS)[:300]
    tokenizer = Tokenizer.train((r["context"] for r in records), vocab_size=2000, show_progress=False)
    recipe = qa.Recipe()
    assert len(qa.training_examples(tokenizer, records, recipe)) >= len(records)
    # Every question whose answer lies inside some window yields at least one training window.
    questions_with_windows = sum(
        any(
            qa.answer_tokens(window, a["answer_start"], a["answer_start"] + len(a["text"])) is not None
            for window in qa.windows_of(tokenizer, r["question"], r["context"], recipe)
        )
        for r in records
        for a in r["answers"][:1]
    )
    assert questions_with_windows / len(records) > 0.95


def test_mcq_records_have_four_choices_and_a_letter():
    for record in task_records(data("mcq"), "valid", mcq.FIELDS):
        assert len(record["choices"]) == 4 and record["answer"] in "ABCD"
