"""Built-in chat data made from the built-in corpora: checkable instructions and preference pairs.

`builtin:instructions` turns every product review into "is this positive or
negative?" and every People's Daily paragraph into one of: repeat a sentence,
name its first character, count the characters of a phrase, or continue it.
A fifth of the conversations get a second, follow-up turn that refers back to
the first (so a model must read its history), and some open with a system
prompt. Every answer except a continuation is checkable by exact match, which
gives a chat model a real held-out accuracy without downloading anything.

`builtin:preferences` is the same prompts as {messages, chosen, rejected}: the
correct answer chosen, a plausible wrong one (the other label, a miscount, a
corrupted copy) rejected.

Everything is a pure function of the text, so the sets never change between
runs. This module knows records, not tokens.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator

from lmforge.data.splits import SPLIT_KEY

SYSTEM_PROMPT = "你是一个乐于助人的中文助手。"
CHECKABLE_KINDS = ("sentiment", "repeat", "first_char", "count", "follow_up")
_SENTENCE_END = re.compile(r"(?<=[。！？])")
POSITIVE, NEGATIVE = "正面", "负面"


def rng_of(text: str) -> random.Random:
    """A generator seeded by the SHA-256 of `text`: what makes each built-in record a pure function of its text."""
    return random.Random(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big"))


def first_sentence(paragraph: str, limit: int = 30) -> str:
    return _SENTENCE_END.split(paragraph, maxsplit=1)[0][:limit]


def _sentiment(text: str, label: int, rng: random.Random) -> dict:
    answer = POSITIVE if int(label) == 1 else NEGATIVE
    wrong = NEGATIVE if answer == POSITIVE else POSITIVE
    record = _record("sentiment", f"这条商品评论是正面还是负面？\n{text}", answer, wrong, rng)
    if rng.random() < 0.2:
        yes = "是" if answer == POSITIVE else "否"
        record = _follow_up(record, "这位顾客满意吗？只回答是或否。", yes, "否" if yes == "是" else "是")
    return record


def _paragraph(paragraph: str, rng: random.Random) -> dict | None:
    sentence = first_sentence(paragraph)
    if len(sentence) < 6:
        return None
    kind = rng.choice(("repeat", "first_char", "count", "continue"))
    if kind == "repeat":
        cut = rng.randrange(1, len(sentence) - 2)
        corrupted = sentence[:cut] + sentence[cut + 2 :]
        record = _record(kind, f"请把这句话原样重复一遍：{sentence}", sentence, corrupted, rng)
    elif kind == "first_char":
        others = [char for char in sentence if char != sentence[0]]
        record = _record(kind, f"“{sentence}”的第一个字是什么？", sentence[0], rng.choice(others), rng)
    elif kind == "count":
        size = rng.randint(2, 8)
        phrase = sentence[:size]
        wrong = len(phrase) + rng.choice((-2, -1, 1, 2)) if len(phrase) > 2 else len(phrase) + 1
        record = _record(kind, f"“{phrase}”有几个字？", f"{len(phrase)}个字", f"{wrong}个字", rng)
    else:
        rest = paragraph[len(sentence) : len(sentence) + 40]
        if len(rest) < 4:
            return None
        record = _record(kind, f"续写这段话：{sentence}", rest, None, rng)
    if kind != "continue" and rng.random() < 0.2:
        wrong = next((char for char in sentence[1:] if char != sentence[0]), "的")
        record = _follow_up(record, "刚才那句话的第一个字是什么？", sentence[0], wrong)
    return record


def _record(kind: str, prompt: str, answer: str, wrong: str | None, rng: random.Random) -> dict:
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
    messages = [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"prompt": prompt, "kind": kind, "messages": messages, "answer": answer, "rejected": wrong}


def _follow_up(record: dict, question: str, answer: str, wrong: str) -> dict:
    messages = [*record["messages"], {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {**record, "kind": "follow_up", "messages": messages, "answer": answer, "rejected": wrong}


def _all(peoples_daily: Callable[[], Iterator[dict]], reviews: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    # split_key: each conversation falls in the split of the review or paragraph it was made from (data/sources.py)
    for review in reviews():
        yield {**_sentiment(review["text"], review["label"], rng_of(review["text"])), SPLIT_KEY: review["text"]}
    for paragraph in peoples_daily():
        record = _paragraph(paragraph["text"], rng_of(paragraph["text"]))
        if record is not None:
            yield {**record, SPLIT_KEY: paragraph["text"]}


def instruction_records(peoples_daily, reviews) -> Iterator[dict]:
    """{prompt, kind, messages, answer}: `answer` is the last assistant message; kinds in CHECKABLE_KINDS are exact."""
    for record in _all(peoples_daily, reviews):
        record.pop("rejected")
        yield record


def preference_records(peoples_daily, reviews) -> Iterator[dict]:
    """{prompt, kind, messages (ending with the user turn), chosen, rejected}, for checkable kinds only."""
    for record in _all(peoples_daily, reviews):
        if record["rejected"] is None or record["rejected"] == record["answer"]:
            continue
        yield {
            "prompt": record["prompt"],
            "kind": record["kind"],
            "messages": record["messages"][:-1],
            "chosen": record["answer"],
            "rejected": record["rejected"],
            SPLIT_KEY: record[SPLIT_KEY],
        }
