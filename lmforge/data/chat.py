"""Conversations -> token ids with a loss mask, through a Jinja chat template (ChatML by default); replies -> parts.

A conversation is a list of `{"role": "system" | "user" | "assistant" | "tool", "content": str}`; an
assistant message may also carry `tool_calls` (OpenAI's `[{id, type: "function", function: {name,
arguments}}]`) and a `reasoning_content` trace, a tool message the `tool_call_id` it answers, and a
conversation may come with `tools` (OpenAI's function signatures, checked as JSON Schema here). It is
rendered by the tokenizer's Jinja `chat_template` (saved in `tokenizer_config.json`, so `transformers`'
`apply_chat_template` gives the same ids, tools included) in a sandboxed environment: a template from a
downloaded model folder can then read only what it is given, never call into Python. The loss mask marks
the tokens a model learns to write: each assistant message (trace, content, calls) and its end marker,
nothing the user, the system or a tool said. `parse_reply` reads a generated reply back into its trace,
its content and its tool calls.

This module knows roles, templates, tool signatures and truncation; it does not know models or training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols

from lmforge.data.template_sandbox import RENDER_SECONDS, BudgetedSandbox, render_budgeted
from lmforge.data.tokenizer import CHATML_TEMPLATE, PLAIN_CHATML_TEMPLATE, Tokenizer
from lmforge.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN = "<think>", "</think>", "<tool_call>"


@dataclass
class ChatTokens:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is part of an assistant reply (content + end marker)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' `tojson` (Jinja's own escapes <, >, & and sorts keys), so both render tools alike.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateRaised(Exception):
    """`raise_exception(message)` called by a template (Hugging Face's templates refuse bad conversations so)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


@lru_cache(maxsize=8)
def _compiled(template: str):
    # The same extensions and tojson as transformers' apply_chat_template, so imported templates (Qwen2.5's) work
    # unchanged; the budgeted sandbox stops templates that loop or build huge strings.
    environment = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    try:
        return environment.compile_template(template)
    except TemplateError as error:
        raise UserError(f"the chat template does not parse: {error}") from None


def check_messages(messages: object, where: str = "") -> list[Message]:
    """The messages, checked: a non-empty list of {role, content}, roles known, a system message only first;
    assistant tool calls well formed (their JSON `arguments` read into objects), each tool message answering
    a call of the assistant message before it."""
    place = f" in {where}" if where else ""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'messages'{place} must be a non-empty list of {{role, content}} objects")
    checked, open_calls = [], None  # open_calls: ids of the last assistant message's calls, while tools answer
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"message {number}{place} needs a string 'content'; got {message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"message {number}{place} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if role == "system" and number > 1:
            raise UserError(f"message {number}{place} is a system message; only the first message may be one")
        if role == "assistant" and message.get("tool_calls"):
            message = {**message, "tool_calls": _check_calls(message["tool_calls"], f"message {number}{place}")}
            open_calls = [call.get("id") for call in message["tool_calls"]]
        elif role == "tool":
            _check_answer(message, open_calls, f"message {number}{place}")
        else:
            open_calls = None
        checked.append(message)
    return checked


def _check_calls(calls: object, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise UserError(f"{where}: 'tool_calls' must be a list of {{id, type, function}} objects")
    checked = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"{where}: a tool call needs a 'function' with a 'name'; got {call!r:.80}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                name = function["name"]
                raise UserError(f"{where}: the arguments of {name} are not JSON: {arguments!r:.80}") from None
        if not isinstance(arguments, dict):
            raise UserError(f"{where}: the arguments of {function['name']} must be a JSON object")
        checked.append({**call, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return checked


def _check_answer(message: Message, open_calls: list | None, where: str) -> None:
    if open_calls is None:
        raise UserError(f"{where} is a tool result, but the message before it made no tool call")
    answered = message.get("tool_call_id")
    if any(call_id is not None for call_id in open_calls) and answered not in open_calls:
        raise UserError(f"{where} answers tool call {answered!r}; the calls made were {open_calls}")


def check_tools(tools: object) -> list[dict] | None:
    """OpenAI-style function signatures, checked: unique valid names, parameters a JSON Schema for an object."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise UserError("'tools' must be a list of {type: 'function', function: {name, description, parameters}}")
    names: set[str] = set()
    for number, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise UserError(f"tool {number} must be {{type: 'function', function: {{name, parameters}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise UserError(f"tool {number} has name {name!r}; a name is 1-64 letters, digits, _ or -")
        if name in names:
            raise UserError(f"two tools are named {name!r}; tool names must differ")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise UserError(f"tool {name!r}: 'description' must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _check_schema(parameters, f"tool {name!r} parameters")
        if parameters.get("type", "object") != "object":
            raise UserError(f"tool {name!r}: parameters must describe an object, not {parameters.get('type')!r}")
    return tools


def _check_schema(schema: object, where: str) -> None:
    """The JSON Schema keywords tools use (type, properties, required, items, enum, description), structurally."""
    if not isinstance(schema, dict):
        raise UserError(f"{where} is not a JSON Schema (an object); got {schema!r:.60}")
    kinds = schema.get("type", "object")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in JSON_TYPES:
            raise UserError(f"{where}: type {kind!r} is not a JSON Schema type ({', '.join(JSON_TYPES)})")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise UserError(f"{where}: 'properties' must be an object of schemas")
    for name, inner in properties.items():
        _check_schema(inner, f"{where}.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(item, str) for item in required):
        raise UserError(f"{where}: 'required' must be a list of property names")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}[items]")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise UserError(f"{where}: 'enum' must be a non-empty list")


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's own template, or ChatML when it has the ChatML markers as special tokens.

    Our plain ChatML of older run folders is read as today's, which renders every conversation they could
    hold the same and adds tools, tool calls and traces."""
    if tokenizer.chat_template and tokenizer.chat_template != PLAIN_CHATML_TEMPLATE:
        return tokenizer.chat_template
    if tokenizer.im_start_id is None or tokenizer.im_end_id is None:
        raise UserError("this tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens to build one")
    return CHATML_TEMPLATE


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    seconds: float = RENDER_SECONDS,
) -> str:
    """The conversation as the template writes it, within a render budget (data/template_sandbox.py).

    Any failure of the template, whatever its exception (OverflowError from a huge range, MemoryError,
    RecursionError, an exhausted budget, its own raise_exception), is one UserError line.
    """
    template_text = chat_template(tokenizer)
    if tools and "tools" not in template_text:
        raise UserError("this model's chat template does not render tools")
    token = tokenizer.backend.id_to_token
    special = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id)}
    template = _compiled(template_text)
    try:
        return render_budgeted(
            template,
            seconds,
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools or None,
            **special,
        )
    except TemplateRaised as error:
        raise UserError(f"the chat template refused this conversation: {error}") from None
    except Exception as error:  # noqa: BLE001 - a template is foreign code: any failure of it is the template's
        raise UserError(f"the chat template failed: {type(error).__name__}: {error}"[:300]) from None


def find_control_token(tokenizer: Tokenizer, text: str) -> str | None:
    """The first of the tokenizer's control tokens typed into `text`, or None.

    Text such as "<|eot_id|><|start_header_id|>system<|end_header_id|>" encodes to the special ids
    themselves (see `Tokenizer`), so a user could close their turn and open a system one. The tokens
    are all the tokenizer's special tokens: lmforge's seven markers, or an imported folder's own.
    """
    found = tokenizer.control_token_pattern.search(text)
    return found.group() if found else None


def check_control_tokens(tokenizer: Tokenizer, messages: Sequence[Message]) -> None:
    """Refuse a conversation whose content holds a control token (`find_control_token`), in one line."""
    for number, message in enumerate(messages, start=1):
        token = find_control_token(tokenizer, message.get("content") or "")
        if token:
            raise UserError(f"message {number} contains '{token}', a control token of this model's chat format")


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    trace_loss: bool = True,
) -> ChatTokens:
    """Token ids of the rendered conversation and which of them carry loss.

    Each message's text is what rendering it adds to the conversation before
    it (a template like ChatML renders prefixes as prefixes). An assistant
    message's loss span runs from where the opened reply turn ends (or, if the
    template opens it otherwise, from its content) to the end of its rendered
    text minus trailing whitespace, i.e. through the end marker; without
    `trace_loss` it starts after the reasoning trace's </think>. Tokens are then
    assigned to spans by their character offsets in one encoding of the whole
    text, so the ids are exactly `tokenizer.encode(render_chat(...))`.
    """
    spans: list[tuple[int, int]] = []
    # NOTE: we never render an empty conversation: templates such as Qwen2.5's read messages[0] unguarded.
    previous = ""
    for index, message in enumerate(messages):
        text = render_chat(tokenizer, messages[: index + 1], False, tools)
        if not text.startswith(previous):
            raise UserError("the chat template does not render a conversation's prefix as its prefix")
        if message["role"] == "assistant":
            start = _reply_start(tokenizer, messages[:index], message, text, previous, tools, trace_loss)
            spans.append((start, len(text.rstrip())))
        previous = text
    full = render_chat(tokenizer, messages, True, tools) if add_generation_prompt else previous
    ids, offsets = tokenizer.encode_with_offsets(full)
    loss_mask = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    return ChatTokens(ids, loss_mask)


def _reply_start(tokenizer, before, message, text, previous, tools, trace_loss: bool) -> int:
    """Where an assistant message's loss span starts in `text` (its rendering after the `previous` messages)."""
    opened = render_chat(tokenizer, before, True, tools) if before else ""
    if opened and text.startswith(opened) and len(opened) > len(previous):
        start = len(opened)
    else:
        found = text.find(message["content"], len(previous)) if message["content"] else -1
        start = found if found >= 0 else len(text.rstrip())
    trace = message.get("reasoning_content")
    if trace and not trace_loss:
        closing = text.find(THINK_CLOSE, text.find(trace, start))
        start = closing + len(THINK_CLOSE) if closing >= 0 else start
    return start


@dataclass
class ParsedReply:
    """A generated reply read back: its reasoning trace, its text, and its tool calls (OpenAI's shape)."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


def parse_reply(
    text: str, parse_calls: bool = True, final: bool = True, known: Collection[str] | None = None
) -> ParsedReply:
    """Split a `<think>trace</think>` off the front, then read `<tool_call>{json}</tool_call>` blocks.

    Calls are taken only when every block holds {"name": str, "arguments": object}, the name one of
    `known` when given: a reply with a malformed block is returned whole as content, never half-read.
    With `parse_calls` the content is stripped of surrounding whitespace; without, a reply with no
    trace is its content unchanged. With
    `final=False` (a reply still being written) each field holds only what more text cannot change, so
    it is a prefix of the same field of the finished reply: what a stream may already send.
    """
    reasoning, body = None, text
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        trace, closed, body = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
        reasoning, body = (trace if closed or final else _without_partial(trace, THINK_CLOSE)).strip("\n"), body
        body = body.lstrip("\n")
    elif not final and THINK_OPEN.startswith(stripped):
        return ParsedReply("")  # it may still open a trace
    if not parse_calls:
        return ParsedReply(body, reasoning)
    start = body.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedReply((body if final else _without_partial(body, TOOL_CALL_OPEN)).strip(), reasoning)
    if not final:
        return ParsedReply(body[:start].strip(), reasoning)
    blocks = TOOL_CALL.findall(body)
    calls = [_read_call(block) for block in blocks]
    if not blocks or None in calls or (known is not None and any(call["name"] not in known for call in calls)):
        return ParsedReply(body.strip(), reasoning)
    return ParsedReply(body[:start].strip(), reasoning, calls)


def _without_partial(text: str, marker: str) -> str:
    """`text` without an end that may be the start of `marker` (it could still become the marker)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size]
    return text


def same_answer(reply: str, answer: str) -> bool:
    """Exact match of a reply and a reference answer, surrounding whitespace and a final full stop ignored."""
    return reply.strip().rstrip("。.！!") == answer.strip().rstrip("。.！!")


def _read_call(block: str) -> dict | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"name": call["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def truncate_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    max_tokens: int,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    trace_loss: bool = True,
) -> tuple[list[Message], ChatTokens]:
    """Drop the oldest turns (never the system message) until the encoding fits `max_tokens`.

    A turn is a user message with the replies that follow it, so the kept
    history still starts with a user message. Raises UserError when even the
    last turn alone does not fit. The tools' signatures are always kept.
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    starts = [0, *(index for index, message in enumerate(rest) if message["role"] == "user" and index > 0)]

    def kept_from(turn: int) -> tuple[list[Message], ChatTokens]:
        kept = system + rest[starts[turn] :]
        return kept, encode_chat(tokenizer, kept, add_generation_prompt, tools, trace_loss)

    kept, tokens = kept_from(0)
    if len(tokens.ids) <= max_tokens:
        return kept, tokens
    last = kept_from(len(starts) - 1)
    if len(last[1].ids) > max_tokens:
        raise UserError(
            f"the last message needs {len(last[1].ids)} tokens with the system prompt; the limit is {max_tokens}"
        )
    # Fewer turns never need more tokens (the template joins messages, and its markers are special tokens that
    # BPE never merges across), so the first turn to keep is found by bisection: a few encodings, not one per turn.
    too_long, fits = 0, len(starts) - 1
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        if len(kept_from(middle)[1].ids) <= max_tokens:
            fits = middle
        else:
            too_long = middle
    return kept_from(fits) if fits != len(starts) - 1 else last
