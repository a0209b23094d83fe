"""Cloze questions from plain text: the answer is where the record says, the question restates its clause."""

import random

from lmforge.data.cloze import clause_spans, cloze_question, cloze_questions
from lmforge.tasks.qa import best_clause

PARAGRAPH = (
    "尤金袋鼠是袋鼠科中体型最小的成员之一，1628年船难的生还者在西澳首次发现了它们。"
    "成年尤金袋鼠的体重大约只有8公斤，主要分布在澳洲南部岛屿及西岸地区；它们在夜间出来觅食。"
)


def test_clauses_are_the_text_between_clause_marks():
    spans = list(clause_spans(PARAGRAPH))
    first, second = (PARAGRAPH[s:e] for s, e in spans[:2])
    assert (first, second) == ("尤金袋鼠是袋鼠科中体型最小的成员之一", "1628年船难的生还者在西澳首次发现了它们")
    assert all("，" not in PARAGRAPH[s:e] and "。" not in PARAGRAPH[s:e] for s, e in spans)


def test_every_cloze_answer_is_at_its_start_and_the_question_asks_for_it():
    records = cloze_questions([PARAGRAPH] * 30, per_text=4, seed=1)
    assert len(records) > 60
    for record in records:
        (answer,) = record["answers"]
        start = answer["answer_start"]
        assert record["context"][start : start + len(answer["text"])] == answer["text"]
        question = record["question"]
        assert question.endswith("？") and ("什么" in question or "多少" in question)
        # The question is the clause around the answer, with the answer's place asked for.
        clause = next((s, e) for s, e in clause_spans(record["context"]) if s <= start < e)
        before, after = question.rstrip("？").split("多少" if "多少" in question else "什么", 1)
        assert set(before) <= set(record["context"][clause[0] : start])
        assert set(after) <= set(record["context"][start + len(answer["text"]) : clause[1]])
    asked = {record["answers"][0]["text"] for record in records}
    assert len(asked) > 10  # different spans of different clauses, not one fixed choice
    assert cloze_questions([PARAGRAPH] * 30, per_text=4, seed=1) == records  # seeded


def test_a_number_is_asked_with_duoshao_and_the_rest_of_the_clause_is_kept():
    text = "成年尤金袋鼠的体重大约只有8公斤"
    for seed in range(40):
        record = cloze_question(text, 0, len(text), random.Random(seed))
        if record is not None and record["answers"][0]["text"] == "8":
            assert "多少" in record["question"]
            break
    else:
        raise AssertionError("no seed asked for the number")
    for seed in range(20):
        record = cloze_question(text, 0, len(text), random.Random(seed))
        question = record["question"].replace("什么", "").replace("多少", "").rstrip("？")
        assert set(question) <= set(text)  # words dropped now and then, never invented


def test_the_baseline_answers_with_the_clause_the_question_restates():
    assert best_clause("它们主要分布在哪些岛屿？", PARAGRAPH) == "主要分布在澳洲南部岛屿及西岸地区"
    assert best_clause("谁在西澳首次发现了尤金袋鼠？", PARAGRAPH) == "1628年船难的生还者在西澳首次发现了它们"
