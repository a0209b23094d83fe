"""Cloze questions: extractive-QA records made from plain text, for a QA model to learn matching before real data.

A clause of a paragraph becomes the question with a span of one to three
jieba words replaced by a question word ("什么", or "多少" for a number), and
the span, still in the paragraph, is the answer. So the model learns the skill
extractive QA rests on: find the part of the context the question restates,
then point at what the question leaves out (cloze-style self-supervision, as
in Lewis et al. 2019, https://arxiv.org/abs/1906.04980, and span-selection
pretraining, Glass et al. 2020, https://arxiv.org/abs/1909.04120). Questions
lose a word now and then, so exact copying is not the whole skill. Records have
the SQuAD shape the `qa` task reads. This module knows text, not tokens.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Iterator

import jieba

jieba.setLogLevel(logging.WARNING)

CLAUSE_END = re.compile(r"[，。；！？：,;!?]")
NUMBER = re.compile(r"[0-9０-９.．%％一二三四五六七八九十百千万亿两]+[年月日号岁个人元次]?")
CONTENT = re.compile(r"[\u4e00-\u9fff0-9A-Za-z０-９]")
PLAIN_WORDS = frozenset("的了是在和与及也都就而或但并被把将对为以于从这那其之有等着个又")  # never an answer alone
MIN_CLAUSE, MAX_CLAUSE = 8, 40  # characters; shorter clauses leave the question too little to match
MAX_ANSWER = 12  # characters
DROP_PROBABILITY = 0.15  # per question word other than the answer's place


def clause_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each clause: the text between punctuation marks that end one, without the mark."""
    start = 0
    for match in CLAUSE_END.finditer(text):
        yield start, match.start()
        start = match.end()
    if start < len(text):
        yield start, len(text)


def cloze_question(text: str, start: int, end: int, rng: random.Random) -> dict | None:
    """One record from the clause text[start:end], or None when the clause has no span worth asking about."""
    words = [(word, start + first, start + last) for word, first, last in jieba.tokenize(text[start:end])]
    answerable = [i for i, (word, _, _) in enumerate(words) if CONTENT.search(word) and word not in PLAIN_WORDS]
    if not answerable or len(words) < 3:
        return None
    first = rng.choice(answerable)
    last = first
    # Grow the span over up to two more content words: answers are phrases ("1998年1月") as often as words.
    while last + 1 < len(words) and last - first < 2 and rng.random() < 0.4:
        following = words[last + 1][0]
        if not CONTENT.search(following) or words[last + 1][2] - words[first][1] > MAX_ANSWER:
            break
        last += 1
    answer_start, answer_end = words[first][1], words[last][2]
    answer = text[answer_start:answer_end]
    if len(answer) > MAX_ANSWER:
        return None
    asked = "多少" if NUMBER.fullmatch(answer) else "什么"
    before = [word for word, _, _ in words[:first] if rng.random() >= DROP_PROBABILITY]
    after = [word for word, _, _ in words[last + 1 :] if rng.random() >= DROP_PROBABILITY]
    question = "".join([*before, asked, *after]) + "？"
    return {"context": text, "question": question, "answers": [{"text": answer, "answer_start": answer_start}]}


def cloze_questions(texts: Iterable[str], per_text: int, seed: int = 0) -> list[dict]:
    """Up to `per_text` cloze questions from each text, on different clauses of 8-40 characters; seeded."""
    rng = random.Random(seed)
    records = []
    for text in texts:
        clauses = [(s, e) for s, e in clause_spans(text) if MIN_CLAUSE <= e - s <= MAX_CLAUSE]
        for start, end in rng.sample(clauses, min(per_text, len(clauses))):
            record = cloze_question(text, start, end, rng)
            if record is not None:
                records.append(record)
    return records
