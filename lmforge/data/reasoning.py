"""`builtin:reasoning`: checkable questions whose answers come after a short worked trace (`reasoning_content`).

Counting the characters of a phrase or adding two three-digit numbers is one
step too many for a small model's single forward pass: the answer token has
to hold the whole computation. Written out first, each step is small: the
trace of a count numbers the characters one by one (`今1 天2 天3 气4`), so the
answer is the last number written; the trace of a sum adds column by column
from the ones, with the carry (`个位 7+5=12，写2进1`), so each line needs one
digit fact. The chat template renders the trace as `<think>\n...\n</think>\n`
before the answer; `trace_loss: false` (chat recipes) trains on the answers only.

Phrases come from People's Daily paragraphs and the summands from a generator
seeded by the paragraph, so each record is a pure function of its paragraph and
falls in that paragraph's split (`split_key`), as `builtin:instructions` does.
The answer (`answer`) is the reply after the trace, checkable by exact match.
This module knows records, not tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from lmforge.data.instructions import SYSTEM_PROMPT, first_sentence, rng_of
from lmforge.data.splits import SPLIT_KEY

KINDS = ("count", "sum")
PLACES = ("个位", "十位", "百位", "千位")


def count_trace(phrase: str) -> str:
    """Each character followed by its position: the last number is the count."""
    return " ".join(f"{char}{position}" for position, char in enumerate(phrase, start=1))


def sum_trace(a: int, b: int) -> str:
    """Column addition from the ones, one line per column, with the carry; the last line gives the sum."""
    lines, carry, place = [], 0, 0
    while a or b or carry:
        digit_a, digit_b = a % 10, b % 10
        total = digit_a + digit_b + carry
        added = f"{digit_a}+{digit_b}" + (f"+{carry}" if carry else "")
        carry_text = "进1" if total >= 10 else ""
        lines.append(f"{PLACES[place]} {added}={total}，写{total % 10}{carry_text}")
        a, b, carry, place = a // 10, b // 10, total // 10, place + 1
    return "\n".join(lines)


def _count(paragraph: str, rng: random.Random) -> dict | None:
    sentence = first_sentence(paragraph)
    if len(sentence) < 6:
        return None
    phrase = sentence[: rng.randint(2, 8)]
    return _record("count", f"“{phrase}”有几个字？", count_trace(phrase), f"{len(phrase)}个字", rng)


def _sum(rng: random.Random) -> dict:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return _record("sum", f"{a}加{b}等于几？", sum_trace(a, b), str(a + b), rng)


def _record(kind: str, prompt: str, trace: str, answer: str, rng: random.Random) -> dict:
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
    reply = {"role": "assistant", "content": answer, "reasoning_content": trace}
    messages = [*system, {"role": "user", "content": prompt}, reply]
    return {"prompt": prompt, "kind": kind, "messages": messages, "answer": answer}


def reasoning_records(peoples_daily: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    """{prompt, kind, messages, answer}: per People's Daily paragraph, a count of a phrase from it and a sum."""
    for paragraph in peoples_daily():
        rng = rng_of(f"reasoning:{paragraph['text']}")
        for record in (_count(paragraph["text"], rng), _sum(rng)):
            if record is not None:
                yield {**record, SPLIT_KEY: paragraph["text"]}
