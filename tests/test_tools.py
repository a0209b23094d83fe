"""Built-in tools: arithmetic through ast (never eval), dates, units, review lookups; builtin:tools is consistent."""

import itertools
from collections import Counter

import pytest

from lmforge.data.chat import check_messages, check_tools
from lmforge.data.sources import builtin_toolbox, read_records
from lmforge.data.tools import TOOL_KINDS, calculate
from lmforge.errors import UserError


def test_calculator_computes_arithmetic():
    assert calculate("3*(4+5)-2**3") == 19
    assert calculate("7/2") == 3.5 and calculate("-7//2") == -4 and calculate("17 % 5") == 2
    assert calculate("12×3÷4") == 9


@pytest.mark.parametrize(
    "expression", ["__import__('os').system('true')", "x + 1", "[1][0]", "9**9**9", "1/0", "1 +", "'a' * 3"]
)
def test_calculator_refuses_everything_but_arithmetic(expression):
    with pytest.raises(UserError):
        calculate(expression)


def test_toolbox_runs_calls_and_names_bad_ones():
    toolbox = builtin_toolbox()
    assert toolbox.run("calculator", {"expression": "1.5*4"}) == "6"
    assert toolbox.run("date", {"start": "1998-01-01", "end": "1998-03-01"}) == "59"
    assert toolbox.run("units", {"value": 2.5, "from": "kg", "to": "斤"}) == "5"
    assert toolbox.run("review", {"number": 1}) in ("正面", "负面")
    for name, arguments, message in [
        ("weather", {}, "no tool named 'weather'"),
        ("calculator", {}, "needs the arguments"),
        ("units", {"value": 1, "from": "km", "to": "kg"}, "cannot convert"),
        ("date", {"start": "1998/1/1", "end": "1998-01-02"}, "YYYY-MM-DD"),
        ("review", {"number": 10**7}, "there are reviews 1 to"),
    ]:
        with pytest.raises(UserError, match=message):
            toolbox.run(name, arguments)
    with pytest.raises(UserError, match="unknown tools"):
        builtin_toolbox(["calculator", "shell"])


def test_builtin_tools_records_are_consistent_with_the_tools():
    """Every call in the data, executed by the toolbox, gives the result the data shows; the answer uses it."""
    toolbox = builtin_toolbox()
    kinds = Counter()
    for record in itertools.islice(read_records("builtin:tools"), 400):
        kinds[record["kind"]] += 1
        check_tools(record["tools"])
        messages = check_messages(record["messages"])
        assert messages[-1] == {"role": "assistant", "content": record["answer"]}
        offered = {tool["function"]["name"] for tool in record["tools"]}
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert len(results) == len(record["calls"])
        for call, result in zip(record["calls"], results):
            assert call["name"] in offered
            assert toolbox.run(call["name"], call["arguments"]) == result
        if results:
            assert record["answer"].startswith(results[-1])
    assert set(kinds) == set(TOOL_KINDS) - {"no_tool"}  # the no-tool questions follow all the reviews
    assert next(r for r in read_records("builtin:tools") if r["kind"] == "no_tool")["calls"] == []


def test_tool_accuracy_runs_the_calls_and_scores_first_calls_and_final_answers(monkeypatch):
    """A stand-in model that calls right on the first record, wrong on the second, and answers from the results."""
    from lmforge.lm import Completion
    from lmforge.tasks import chat

    records = [r for r in itertools.islice(read_records("builtin:tools"), 12) if r["kind"] == "calculator"][:2]

    class Scripted:
        def __init__(self):
            self.turns = 0

        def chat_complete(self, conversations, tools, **sampling):
            self.turns += 1
            replies = []
            for number, messages in enumerate(conversations):
                record = records[number]
                if messages[-1]["role"] == "tool":
                    replies.append(messages[-1]["content"])  # answers with the tool's result
                    continue
                expression = record["calls"][0]["arguments"]["expression"] + ("" if number == 0 else "+1")
                replies.append(f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}'
                               "</tool_call>")  # fmt: skip
            return [Completion(text, "stop", 0, 0) for text in replies]

    monkeypatch.setattr(chat, "fits_context", lambda *arguments: True)
    model = Scripted()
    assert chat.tool_accuracy(model, records) == {"tool_call_accuracy": 0.5, "answer_accuracy": 0.5}
    assert model.turns == 2
