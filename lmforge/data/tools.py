"""Built-in tools a chat model can call, and `builtin:tools`: conversations that call them, with checkable answers.

The tools (`Toolbox`): `calculator` (arithmetic read with `ast`, never `eval`), `date` (days between
two dates), `units` (length, mass, time) and `review` (the label of a numbered product review
of the built-in corpus). Each has an OpenAI-style signature (`TOOLS`) that the chat template renders into the
system turn, and `Toolbox.run(name, arguments)` executes a call and returns its result as text.

`builtin:tools` turns the built-in corpora and a seeded generator into conversations: one calculation, two
calculations where the second uses the first's result, a date difference, a unit conversion, a review lookup,
and questions that need no tool although tools are offered. Each record is {prompt, kind, tools, messages,
answer, calls}: `answer` is the final reply, `calls` the calls a correct model makes, in order. Everything is a
pure function of the corpora, so the set never changes between runs. This module knows records and tools,
not tokens or models.
"""

from __future__ import annotations

import ast
import datetime
import json
import operator
import random
from collections.abc import Callable, Iterator

from lmforge.data.chat import parse_reply, same_answer
from lmforge.data.instructions import NEGATIVE, POSITIVE, first_sentence, rng_of
from lmforge.errors import UserError


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = {
    "calculator": _function(
        "calculator", "计算算式", {"expression": {"type": "string", "description": "如 (3+4)*5"}}, ["expression"]
    ),
    "date": _function(
        "date", "两个日期相差的天数", {"start": {"type": "string"}, "end": {"type": "string"}}, ["start", "end"]
    ),
    "units": _function(
        "units",
        "单位换算",
        {"value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
        ["value", "from", "to"],
    ),
    "review": _function("review", "查第几条商品评论的情感", {"number": {"type": "integer"}}, ["number"]),
}
# Units by dimension, in the dimension's base unit (metre, gram, second).
UNITS = {
    "km": 1000, "m": 1, "cm": 0.01, "mm": 0.001,
    "kg": 1000, "斤": 500, "g": 1,
    "h": 3600, "min": 60, "s": 1,
}  # fmt: skip
DIMENSION = {"km": "length", "m": "length", "cm": "length", "mm": "length", "kg": "mass", "斤": "mass", "g": "mass",
             "h": "time", "min": "time", "s": "time"}  # fmt: skip
UNIT_NAMES = {"km": "公里", "m": "米", "cm": "厘米", "mm": "毫米", "kg": "千克", "斤": "斤", "g": "克",
              "h": "小时", "min": "分钟", "s": "秒"}  # fmt: skip
OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
MAX_EXPONENT = 64  # 9**9**9 would run for hours


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses), read with `ast`, never eval."""
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise UserError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body, expression)


def _value(node: ast.AST, expression: str) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand, expression)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _value(node.left, expression), _value(node.right, expression)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise UserError(f"exponent {right} is too large (at most {MAX_EXPONENT}) in {expression!r}")
        try:
            return OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise UserError(f"division by zero in {expression!r}") from None
    raise UserError(f"only numbers and + - * / // % ** ( ) are allowed: {expression!r}")


def number_text(value: int | float) -> str:
    """A result as people write it: 12 not 12.0, at most 4 decimals."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}".rstrip("0").rstrip(".")


def date_diff(start: str, end: str) -> int:
    try:
        first, last = (datetime.date.fromisoformat(day) for day in (start, end))
    except (TypeError, ValueError):
        raise UserError(f"dates are written YYYY-MM-DD; got {start!r} and {end!r}") from None
    return (last - first).days


def convert_units(value: float, unit: str, target: str) -> float:
    if unit not in UNITS or target not in UNITS:
        raise UserError(f"unknown unit {unit if unit not in UNITS else target!r}; known: {', '.join(UNITS)}")
    if DIMENSION[unit] != DIMENSION[target]:
        raise UserError(f"cannot convert {unit} ({DIMENSION[unit]}) to {target} ({DIMENSION[target]})")
    return value * UNITS[unit] / UNITS[target]


class Toolbox:
    """The built-in tools, by name; `reviews` reads the review corpus for `review` (read once, on first use)."""

    def __init__(self, reviews: Callable[[], Iterator[dict]], names: list[str] | None = None) -> None:
        unknown = sorted(set(names or []) - set(TOOLS))
        if unknown:
            raise UserError(f"unknown tools {unknown}; the built-in tools are {', '.join(TOOLS)}")
        self.names = list(names or TOOLS)
        self._reviews = reviews
        self._labels: list[int] | None = None

    @property
    def signatures(self) -> list[dict]:
        return [TOOLS[name] for name in self.names]

    def run(self, name: str, arguments: dict) -> str:
        """Execute one call; a UserError says what was wrong with it (the model gets that line as the result)."""
        if name not in self.names:
            raise UserError(f"no tool named {name!r}; the tools are {', '.join(self.names)}")
        required = TOOLS[name]["function"]["parameters"]["required"]
        missing = [key for key in required if key not in arguments]
        if missing:
            raise UserError(f"{name} needs the arguments {missing}")
        try:
            if name == "calculator":
                return number_text(calculate(str(arguments["expression"])))
            if name == "date":
                return str(date_diff(arguments["start"], arguments["end"]))
            if name == "units":
                return number_text(convert_units(float(arguments["value"]), arguments["from"], arguments["to"]))
            return self.lookup_review(int(arguments["number"]))
        except (TypeError, ValueError, OverflowError) as error:
            raise UserError(f"{name}: bad arguments {json.dumps(arguments, ensure_ascii=False)}: {error}") from None

    def answer(self, calls: list[dict], prefix: str = "call") -> list[dict]:
        """The assistant message making `calls` ({name, arguments}) and one tool message per call with its result,
        or its error as one line (a model can read it and try again)."""
        named = [{"id": f"{prefix}_{n}", "type": "function", "function": call} for n, call in enumerate(calls)]
        messages = [{"role": "assistant", "content": "", "tool_calls": named}]
        for call in named:
            try:
                result = self.run(call["function"]["name"], call["function"]["arguments"])
            except UserError as error:
                result = f"error: {error}"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        return messages

    def lookup_review(self, number: int) -> str:
        if self._labels is None:
            self._labels = [int(review["label"]) for review in self._reviews()]
        if not 1 <= number <= len(self._labels):
            raise UserError(f"there are reviews 1 to {len(self._labels)}, not {number}")
        return POSITIVE if self._labels[number - 1] == 1 else NEGATIVE


def call_reward(reply: str, record: dict, toolbox: Toolbox) -> float:
    """1.0 when a reply to a `builtin:tools` prompt makes the record's first call right (the right tool, and a
    result equal to the expected call's), or, where no tool is needed, answers right without a call; else 0.0."""
    parsed = parse_reply(reply, known=[tool["function"]["name"] for tool in record.get("tools") or []])
    expected = record.get("calls") or []
    if not expected:
        return float(not parsed.tool_calls and same_answer(parsed.content, record["answer"]))
    if not parsed.tool_calls or parsed.tool_calls[0]["name"] != expected[0]["name"]:
        return 0.0
    try:
        made = toolbox.run(parsed.tool_calls[0]["name"], parsed.tool_calls[0]["arguments"])
    except UserError:
        return 0.0
    return float(made == toolbox.run(expected[0]["name"], expected[0]["arguments"]))


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def _conversation(kind: str, prompt: str, tools: list[str], steps: list[tuple[dict, str]], answer: str, rng) -> dict:
    """A record whose assistant makes each call of `steps` in turn, reads its result, then answers."""
    messages = [{"role": "user", "content": prompt}]
    for number, (call, result) in enumerate(steps, start=1):
        call_id = f"call_{number}"
        tool_call = {"id": call_id, "type": "function", "function": call}
        messages += [{"role": "assistant", "content": "", "tool_calls": [tool_call]},
                     {"role": "tool", "tool_call_id": call_id, "content": result}]  # fmt: skip
    messages.append({"role": "assistant", "content": answer})
    # A question that needs no tool is offered one anyway: when to call is learnt too. (Others get only theirs:
    # every tool line costs ~30 tokens of a 256-token demo context.)
    offered = tools or [rng.choice(list(TOOLS))]
    return {"prompt": prompt, "kind": kind, "tools": [TOOLS[name] for name in offered], "messages": messages,
            "answer": answer, "calls": [call for call, _ in steps]}  # fmt: skip


def _arithmetic(rng: random.Random) -> dict:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 50)
    expression = rng.choice((f"{a}*{b}+{c}", f"{a}+{b}*{c}", f"({a}+{b})*{c}", f"{a}*{b}-{c}"))
    value = number_text(calculate(expression))
    prompt = rng.choice(("计算 {} 等于多少？", "{} 是多少？", "帮我算一下 {}"))
    return _conversation("calculator", prompt.format(expression), ["calculator"],
                         [(_call("calculator", expression=expression), value)], value, rng)  # fmt: skip


def _two_steps(rng: random.Random) -> dict:
    per_box, boxes, used = rng.randint(6, 48), rng.randint(2, 20), rng.randint(1, 30)
    total = per_box * boxes
    prompt = f"一箱有{per_box}个苹果，买了{boxes}箱，吃掉{used}个，还剩几个？"
    steps = [(_call("calculator", expression=f"{per_box}*{boxes}"), str(total)),
             (_call("calculator", expression=f"{total}-{used}"), str(total - used))]  # fmt: skip
    return _conversation("two_steps", prompt, ["calculator"], steps, f"{total - used}个", rng)


def _dates(rng: random.Random) -> dict:
    start = datetime.date(1998, 1, 1) + datetime.timedelta(days=rng.randint(0, 700))
    end = start + datetime.timedelta(days=rng.randint(1, 400))
    days = str((end - start).days)
    prompt = f"从{start.isoformat()}到{end.isoformat()}有多少天？"
    call = _call("date", start=start.isoformat(), end=end.isoformat())
    return _conversation("date", prompt, ["date"], [(call, days)], f"{days}天", rng)


def _units(rng: random.Random) -> dict:
    unit, target = rng.choice((("km", "m"), ("m", "cm"), ("kg", "g"), ("kg", "斤"), ("h", "min"), ("min", "s")))
    value = rng.choice((rng.randint(1, 60), rng.randint(1, 99) / 10))
    result = number_text(convert_units(value, unit, target))
    prompt = f"{number_text(value)}{UNIT_NAMES[unit]}是多少{UNIT_NAMES[target]}？"
    call = _call("units", value=value, **{"from": unit, "to": target})
    return _conversation("units", prompt, ["units"], [(call, result)],
                         f"{result}{UNIT_NAMES[target]}", rng)  # fmt: skip


def _review(number: int, label: int, rng: random.Random) -> dict:
    answer = POSITIVE if label == 1 else NEGATIVE
    call = _call("review", number=number)
    return _conversation("review", f"第{number}条商品评论是正面还是负面？", ["review"],
                         [(call, answer)], answer, rng)  # fmt: skip


def _no_tool(paragraph: str, rng: random.Random) -> dict | None:
    sentence = first_sentence(paragraph)
    if len(sentence) < 6:
        return None
    return _conversation("no_tool", f"“{sentence}”的第一个字是什么？", [], [], sentence[0], rng)


GENERATED = (_arithmetic, _two_steps, _dates, _units)


def tool_records(peoples_daily: Callable[[], Iterator[dict]], reviews: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    """Tool-use conversations: per review of every 10th, one lookup and one of each generated kind; then, per
    30th paragraph of People's Daily, a question that needs no tool."""
    for number, review in enumerate(reviews(), start=1):
        if number % 10:
            continue
        rng = rng_of(f"tools:{number}")
        yield _review(number, int(review["label"]), rng)
        for kind in GENERATED:
            yield kind(rng)
    for number, paragraph in enumerate(peoples_daily()):
        record = _no_tool(paragraph["text"], rng_of(paragraph["text"])) if number % 30 == 0 else None
        if record is not None:
            yield record


TOOL_KINDS = ("calculator", "two_steps", "date", "units", "review", "no_tool")
