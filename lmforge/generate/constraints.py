"""Constrained decoding: logits processors that allow only the tokens which keep the text inside a template.

A template is a list of slots: `None` for any Han character, or one fixed character ("，", "。", "\\n"). A
`TemplateConstraint` (shared by every row that decodes the same template) knows what each token id spells
(`TokenTable`); its per-row `Cursor` says which ids may come next (`allowed`) and moves on with the chosen one
(`advance`). The engine masks a row's logits with `allowed` before the repetition penalty, temperature, top-k
and top-p (generate/sampling.py), so every setting samples among allowed tokens only, and the text fills the
template exactly and then ends (the end-of-sequence token is the only one allowed after the last slot).

A token is allowed when it is a run of Han characters that fits the Han slots left in the current run, or its text
is the next fixed characters. Tokens holding part of a UTF-8 character are never allowed. An optional rhyme: at
`rhyme_slots` the character must fall in the rhyme group of the first rhyme slot (`rhyme_group` maps a character to
its group); where the vocabulary has no such token, the rhyme gives way and the form still holds.

Knows token ids and their text; does not know models, poems or tokenizers (data/poetry.py builds templates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from lmforge.data.tokenizer import HAN
from lmforge.errors import UserError

HAN_RUN = re.compile(f"[{HAN}]+")
HAN_SLOT = None


class TokenTable:
    """Each token id's text (None when it is not whole characters: part of a UTF-8 character, a special token)."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self.texts: list[str | None] = []
        for data in token_bytes:
            try:
                self.texts.append(data.decode("utf-8") or None)
            except UnicodeDecodeError:
                self.texts.append(None)
        self.han_length = torch.tensor([len(t) if t and HAN_RUN.fullmatch(t) else 0 for t in self.texts])  # (V,)
        self.literals: dict[str, list[int]] = {}
        for token_id, text in enumerate(self.texts):
            if text and not self.han_length[token_id]:
                self.literals.setdefault(text, []).append(token_id)


class TemplateConstraint:
    """The allowed ids at each slot of one template (computed once per slot, shared by all rows)."""

    def __init__(
        self,
        table: TokenTable,
        template: Sequence[str | None],
        end_id: int,
        rhyme_slots: Sequence[int] = (),
        rhyme_group: Callable[[str], str] | None = None,
    ) -> None:
        self.table, self.template, self.end_id = table, list(template), end_id
        self.rhyme_slots = set(rhyme_slots) if rhyme_group else set()
        # The Han slots left in the current run of Han slots, at each position.
        self.run = [0] * (len(self.template) + 1)
        for position in reversed(range(len(self.template))):
            self.run[position] = self.run[position + 1] + 1 if self.template[position] is HAN_SLOT else 0
        missing = [c for c in set(self.template) - {HAN_SLOT} if c not in table.literals]
        if missing or not bool((table.han_length == 1).any()):
            what = ", ".join(repr(c) for c in missing) or "a single Han character"
            raise UserError(f"this tokenizer has no token for {what}: it cannot spell the constrained form")
        self.groups: list[str | None] = []
        if self.rhyme_slots:
            self.groups = [rhyme_group(text[-1]) if length else None
                           for text, length in zip(table.texts, table.han_length.tolist())]  # fmt: skip
        self.cache: dict[tuple[int, str | None], torch.Tensor] = {}

    @property
    def max_tokens(self) -> int:
        """The most new tokens a row may need: one per slot, plus the end."""
        return len(self.template) + 1

    def start(self) -> Cursor:
        return Cursor(self)

    def mask(self, position: int, group: str | None) -> torch.Tensor:
        """(V,) bool: the ids allowed at `position` (ending a rhyme slot's run in `group`, when given)."""
        key = (position, group)
        if key not in self.cache:
            self.cache[key] = self._mask(position, group)
        return self.cache[key]

    def _mask(self, position: int, group: str | None) -> torch.Tensor:
        allowed = torch.zeros(len(self.table.texts), dtype=torch.bool)
        if position == len(self.template):
            allowed[self.end_id] = True
            return allowed
        run = self.run[position]
        if run:
            lengths = self.table.han_length
            allowed = (lengths >= 1) & (lengths <= run)
            end = position + run - 1
            if group is not None and end in self.rhyme_slots:  # a token that reaches the slot must rhyme
                rhyming = torch.tensor([g == group for g in self.groups])
                restricted = allowed & ((lengths < run) | rhyming)
                allowed = restricted if bool((restricted & (lengths == run)).any()) else allowed
            return allowed
        fixed = ""  # the fixed characters up next, up to the next Han slot
        for slot in self.template[position:]:
            if slot is HAN_SLOT:
                break
            fixed += slot
        for size in range(1, len(fixed) + 1):
            allowed[self.table.literals.get(fixed[:size], [])] = True
        return allowed


class Cursor:
    """One row's place in a template: which ids may come next, and the rhyme its first rhyme slot set."""

    def __init__(self, constraint: TemplateConstraint) -> None:
        self.constraint = constraint
        self.position = 0
        self.group: str | None = None

    def allowed(self, device: torch.device) -> torch.Tensor:
        return self.constraint.mask(self.position, self.group).to(device)

    def advance(self, token_id: int) -> None:
        constraint = self.constraint
        if token_id == constraint.end_id:
            self.position = len(constraint.template)
            return
        text = constraint.table.texts[token_id] or ""
        start, self.position = self.position, self.position + len(text)
        if self.group is None and constraint.rhyme_slots:
            for slot in range(start, self.position):
                if slot in constraint.rhyme_slots:
                    self.group = constraint.groups[token_id]


def mask_logits(logits: torch.Tensor, cursors: Sequence[Cursor | None]) -> torch.Tensor:
    """logits (B, V) with every id a row's cursor does not allow set to -inf (rows without a cursor unchanged)."""
    if all(cursor is None for cursor in cursors):
        return logits
    masked = logits.clone()
    for row, cursor in enumerate(cursors):
        if cursor is not None:
            allowed = cursor.allowed(logits.device)  # (tokenizer's V,): a model may have more (padded) rows
            masked[row, : len(allowed)].masked_fill_(~allowed, float("-inf"))
            masked[row, len(allowed) :] = float("-inf")
    return masked


def check_room(constraint: TemplateConstraint, max_new_tokens: int, what: str) -> None:
    """A UserError when `max_new_tokens` could end the text before the template is filled."""
    if max_new_tokens < constraint.max_tokens:
        raise UserError(f"{what} needs up to {constraint.max_tokens} new tokens (one per character and mark, and the "
                        f"end); max_new_tokens is {max_new_tokens}")  # fmt: skip
