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
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class ChatTokens:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is part of an assistant reply (content + end marker)


@lru_cache(maxsize=8)
def _compiled(template: str):
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return environment.from_string(template)
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


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    token = tokenizer.backend.id_to_token
    special = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id)}
    try:
        return _compiled(chat_template(tokenizer)).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **special
        )
    except TemplateError as error:
        raise UserError(f"the chat template failed: {error}") from None


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
    starts = [0, *(index for index, message in enumerate(rest) if message["role"] == "user" and index > 0)]

    def kept_from(turn: int) -> tuple[list[Message], ChatTokens]:
        kept = system + rest[starts[turn] :]
        return kept, encode_chat(tokenizer, kept, add_generation_prompt)

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
