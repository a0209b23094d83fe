"""Conversations -> token ids with a loss mask, through a Jinja chat template (ChatML by default).

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`.
It is rendered by the tokenizer's Jinja `chat_template` (saved in
`tokenizer_config.json`, so `transformers`' `apply_chat_template` gives the same
ids) in a sandboxed environment: a template from a downloaded model folder can
then read only what it is given, never call into Python. The loss mask marks the
tokens a model learns to write: each assistant message's content and its end
marker, nothing the user or the system said.

This module knows roles, templates and truncation; it does not know models or
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from jinja2.exceptions import TemplateError

from lmforge.data.template_sandbox import RENDER_SECONDS, BudgetedSandbox, render_budgeted
from lmforge.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class ChatTokens:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is part of an assistant reply (content + end marker)


class TemplateRaised(Exception):
    """`raise_exception(message)` called by a template (Hugging Face's templates refuse bad conversations so)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


@lru_cache(maxsize=8)
def _compiled(template: str):
    environment = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_exception
    try:
        return environment.compile_template(template)
    except TemplateError as error:
        raise UserError(f"the chat template does not parse: {error}") from None


def check_messages(messages: object, where: str = "") -> list[Message]:
    """The messages, checked: a non-empty list of {role, content}, roles known, a system message only first."""
    place = f" in {where}" if where else ""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'messages'{place} must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"message {number}{place} needs a string 'content'; got {message!r:.80}")
        if message.get("role") not in ROLES:
            role = message.get("role")
            raise UserError(f"message {number}{place} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if message["role"] == "system" and number > 1:
            raise UserError(f"message {number}{place} is a system message; only the first message may be one")
    return messages


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's own template, or ChatML when it has the ChatML markers as special tokens."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.im_start_id is None or tokenizer.im_end_id is None:
        raise UserError("this tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens to build one")
    return CHATML_TEMPLATE


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
    seconds: float = RENDER_SECONDS,
) -> str:  # fmt: skip
    """The conversation as the template writes it, within a render budget (data/template_sandbox.py).

    Any failure of the template, whatever its exception (OverflowError from a huge range, MemoryError,
    RecursionError, an exhausted budget, its own raise_exception), is one UserError line.
    """
    token = tokenizer.backend.id_to_token
    special = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id)}
    template = _compiled(chat_template(tokenizer))
    try:
        return render_budgeted(
            template, seconds, messages=list(messages), add_generation_prompt=add_generation_prompt, **special
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
        token = find_control_token(tokenizer, message["content"])
        if token:
            raise UserError(f"message {number} contains '{token}', a control token of this model's chat format")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> ChatTokens:
    """Token ids of the rendered conversation and which of them carry loss.

    Each message's text is what rendering it adds to the conversation before
    it (a template like ChatML renders prefixes as prefixes). An assistant
    message's loss span runs from its content to the end of its rendered text
    minus trailing whitespace, i.e. through the end marker. Tokens are then
    assigned to spans by their character offsets in one encoding of the whole
    text, so the ids are exactly `tokenizer.encode(render_chat(...))`.
    """
    spans: list[tuple[int, int]] = []
    # NOTE: we never render an empty conversation: templates such as Qwen2.5's read messages[0] unguarded.
    previous = ""
    for index, message in enumerate(messages):
        text = render_chat(tokenizer, messages[: index + 1], False)
        if not text.startswith(previous):
            raise UserError("the chat template does not render a conversation's prefix as its prefix")
        if message["role"] == "assistant":
            piece = text[len(previous) :]
            start = piece.find(message["content"]) if message["content"] else len(piece.rstrip())
            spans.append((len(previous) + max(start, 0), len(previous) + len(piece.rstrip())))
        previous = text
    full = render_chat(tokenizer, messages, True) if add_generation_prompt else previous
    ids, offsets = tokenizer.encode_with_offsets(full)
    loss_mask = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    return ChatTokens(ids, loss_mask)


def truncate_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], max_tokens: int, add_generation_prompt: bool = False
) -> tuple[list[Message], ChatTokens]:
    """Drop the oldest turns (never the system message) until the encoding fits `max_tokens`.

    A turn is a user message with the replies that follow it, so the kept
    history still starts with a user message. Raises UserError when even the
    last turn alone does not fit.
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    while True:
        tokens = encode_chat(tokenizer, system + rest, add_generation_prompt)
        if len(tokens.ids) <= max_tokens:
            return system + rest, tokens
        turn_starts = [index for index, message in enumerate(rest) if message["role"] == "user" and index > 0]
        if not turn_starts:
            raise UserError(
                f"the last message needs {len(tokens.ids)} tokens with the system prompt; the limit is {max_tokens}"
            )
        rest = rest[turn_starts[0] :]
