"""Jinja's sandbox with a render budget, so that no chat template can run forever or fill memory.

Jinja's `ImmutableSandboxedEnvironment` stops a template from calling into Python, not from working
hard: `{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}` runs for hours
and `'x' * 10**11` asks for 100 GB. `BudgetedSandbox` meters every render:

- steps: each loop iteration and each call (macros, methods, `loop()` recursion) takes one step from
  `MAX_STEPS`, and each step checks the render's deadline;
- text: every string or list built by `*`, `+`, `%`, `~`, a filter, a method or `str.format`, and every
  piece of output, counts against `MAX_CHARACTERS`; sizes known in advance (`'x' * n`, a width of
  `n` in a format, an integer argument `n`) are refused before anything is allocated;
- numbers: `**` and `*` on integers are refused past `MAX_INT_BITS`.

A Python thread cannot be stopped from outside; this budget is how a render thread stops itself.
This module knows Jinja, not tokenizers or chats (data/chat.py renders conversations with it).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_STEPS = 1_000_000  # loop iterations + calls in one render
MAX_CHARACTERS = 50_000_000  # characters (or list items) built and written in one render
MAX_INT_BITS = 100_000  # the largest integer `*` or `**` may make
RENDER_SECONDS = 5.0  # the default wall-clock limit of one render
LARGE_WIDTH = re.compile(r"[%{][^%{}]*?\d{7}")  # a %-format or {}-format field with a width of a million or more


class RenderBudgetExceeded(Exception):
    """A template went over its render budget (steps, characters, time or number size)."""


@dataclass
class _Budget:
    steps: int
    characters: int
    deadline: float

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderBudgetExceeded(f"the template took more than {MAX_STEPS:,} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise RenderBudgetExceeded("the template took longer than its render time limit")

    def spend(self, size: int) -> None:
        self.characters -= size
        if self.characters < 0:
            raise RenderBudgetExceeded(f"the template built more than {MAX_CHARACTERS:,} characters")


_budget: ContextVar[_Budget] = ContextVar("template_budget")


def _sized(value):
    """Count a built value against the budget (strings and sequences by length); return it unchanged."""
    if isinstance(value, (str, list, tuple, dict)):
        _budget.get().spend(len(value))
    return value


def _check_arguments(args: Iterable, kwargs: dict) -> None:
    """Refuse an integer argument or a format width that alone asks for more than the budget allows."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARACTERS:
            raise RenderBudgetExceeded(f"an argument of {value:,} is over the template's size limit")


def _check_format(text: str) -> None:
    if LARGE_WIDTH.search(text):
        raise RenderBudgetExceeded("a format field asks for a width of a million characters or more")


def _metered(iterable):
    """A loop's items, one budget step each."""
    budget = _budget.get()
    for item in iterable:
        budget.step()
        yield item


class _Meter(NodeTransformer):
    """Rewrite a parsed template so its loops and `~` concatenations report to the budget.

    The hooks are environment attributes (`environment.metered(...)`), which no template can
    rename or shadow the way it could a global variable.
    """

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("metered"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute("sized"), [self.generic_visit(node)], [], None, None)


def _budgeted_filter(name: str, function):
    @functools.wraps(function)  # keeps Jinja's pass_context / pass_environment marks
    def budgeted(*args, **kwargs):
        _budget.get().step()
        _check_arguments(args, kwargs)
        if name == "format" and args and isinstance(args[0], str):
            _check_format(args[0])
        return _sized(function(*args, **kwargs))

    return budgeted


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every render metered (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    metered = staticmethod(_metered)
    sized = staticmethod(_sized)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.filters = {name: _budgeted_filter(name, function) for name, function in self.filters.items()}

    def compile_template(self, source: str):
        """The template, parsed and rewritten so its loops and concatenations are metered."""
        return self.from_string(_Meter().visit(self.parse(source)))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own spelling, see its sandbox)
        _budget.get().step()
        _check_arguments(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left, right):
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() * abs(right) if operator == "**" else left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS and abs(left) > 1:
                raise RenderBudgetExceeded(f"'{operator}' would make a number of about {bits:,} bits")
        elif operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and hasattr(sequence, "__len__"):
                _budget.get().spend(len(sequence) * max(times, 0))  # before the multiplication allocates it
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return _sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


def render_budgeted(template, seconds: float = RENDER_SECONDS, **variables) -> str:
    """Render a template from `BudgetedSandbox.compile_template` within the budget, or raise.

    Output is counted piece by piece as the template writes it, so a loop that writes a long
    string many times stops at the budget instead of joining it all at the end.
    """
    token = _budget.set(_Budget(MAX_STEPS, MAX_CHARACTERS, time.monotonic() + seconds))
    try:
        return "".join(_sized(piece) for piece in template.generate(**variables))
    finally:
        _budget.reset(token)
