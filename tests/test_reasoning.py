"""builtin:reasoning: every worked trace is right and ends in the answer; scoring reads the answer after the trace."""

import itertools
import re

import pytest

from lmforge.data.reasoning import count_trace, sum_trace
from lmforge.data.sources import read_records, read_split
from lmforge.data.splits import SPLIT_KEY
from lmforge.tasks import chat


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(itertools.islice(read_records("builtin:reasoning"), 3000))


def digits_written(trace: str) -> str:
    """The digit each line of a column-addition trace writes, from the highest column down."""
    return "".join(re.search(r"写(\d)", line).group(1) for line in reversed(trace.splitlines()))


def test_sum_traces_add_column_by_column_and_end_in_the_answer(records):
    sums = [r for r in records if r["kind"] == "sum"]
    assert len(sums) > 1000 and any("进1" in r["messages"][-1]["reasoning_content"] for r in sums)
    for record in sums:
        a, b = map(int, re.fullmatch(r"(\d+)加(\d+)等于几？", record["messages"][-2]["content"]).groups())
        trace = record["messages"][-1]["reasoning_content"]
        for line in trace.splitlines():  # each line's own arithmetic is right
            left, total = re.search(r" ([\d+]+)=(\d+)，", line).groups()
            assert sum(map(int, left.split("+"))) == int(total)
        assert digits_written(trace) == record["answer"] == record["messages"][-1]["content"] == str(a + b)


def test_count_traces_number_each_character_of_the_phrase(records):
    counts = [r for r in records if r["kind"] == "count"]
    assert len(counts) > 1000
    for record in counts:
        phrase = re.fullmatch(r"“(.+)”有几个字？", record["messages"][-2]["content"], re.S).group(1)
        trace = record["messages"][-1]["reasoning_content"]
        assert trace == " ".join(f"{c}{i}" for i, c in enumerate(phrase, 1)) and trace.endswith(str(len(phrase)))
        assert record["answer"] == f"{len(phrase)}个字"
        assert record[SPLIT_KEY].startswith(phrase)  # split with the paragraph it came from


def test_the_traces_of_a_few_known_cases():
    assert count_trace("今天天气") == "今1 天2 天3 气4"
    assert sum_trace(57, 25) == "个位 7+5=12，写2进1\n十位 5+2+1=8，写8"
    assert sum_trace(950, 50) == "个位 0+0=0，写0\n十位 5+5=10，写0进1\n百位 9+0+1=10，写0进1\n千位 0+0+1=1，写1"


def test_records_fall_in_the_split_of_their_paragraph():
    test = list(itertools.islice(read_split("builtin:reasoning", "test"), 200))
    paragraphs = {r[SPLIT_KEY] for r in test}
    train = itertools.islice(read_split("builtin:reasoning", "train"), 5000)
    assert test and not any(r[SPLIT_KEY] in paragraphs for r in train)


def test_exact_match_compares_the_answer_after_the_trace():
    records = [{"answer": "946", "kind": "sum"}, {"answer": "946", "kind": "sum"}, {"answer": "4个字", "kind": "count"}]
    replies = ["<think>\n个位 2+4=6，写6\n</think>\n946", "<think>\n946\n</think>\n945", "4个字"]
    scores = chat.exact_match(records, replies)
    assert scores == {"accuracy": 2 / 3, "accuracy_count": 1.0, "accuracy_sum": 0.5}
