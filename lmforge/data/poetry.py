"""Classical Chinese poems: their forms, reading them from the chinese-poetry corpus, and rhyme groups.

A regulated form is a number of lines of equal length (five or seven characters), written as in the corpus:
two lines per text line, the first ending with "，" and the second with "。" (`白日依山尽，黄河入海流。`).
`form_template` spells a form as slots a decoding constraint fills (generate/constraints.py): a Han character
(`HAN_SLOT`) or a fixed character. Rhyme groups come from pinyin finals (the `pypinyin` package), with the medial
(i, u, ü) dropped, so 光 (uang), 霜 (uang) and 乡 (iang) share the group "ang": a coarse modern approximation of
the classical rhyme tables, stated as such in reports.

Knows text; does not know tokens or models.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from lmforge.data.tokenizer import HAN
from lmforge.errors import UserError

HAN_SLOT = None  # a template slot any Han character fills (the convention of generate/constraints.py)

COMMA, FULL_STOP = "，", "。"


@dataclass(frozen=True)
class Form:
    name: str
    line_length: int  # characters per line
    line_count: int

    def template(self) -> list[str | None]:
        """The body as slots: line after line of Han characters, "，" after odd lines, "。\\n" after even ones
        (no newline after the last)."""
        slots: list[str | None] = []
        for line in range(self.line_count):
            slots += [HAN_SLOT] * self.line_length
            slots.append(COMMA if line % 2 == 0 else FULL_STOP)
            if line % 2 == 1 and line < self.line_count - 1:
                slots.append("\n")
        return slots

    def rhyme_slots(self) -> list[int]:
        """The template positions of the last character of every even line (2nd, 4th, ...): where rhymes fall."""
        per_couplet = 2 * (self.line_length + 1) + 1  # two lines, their punctuation and the newline
        return [couplet * per_couplet + 2 * self.line_length for couplet in range(self.line_count // 2)]


FORMS = {
    form.name: form
    for form in (Form("五言绝句", 5, 4), Form("七言绝句", 7, 4), Form("五言律诗", 5, 8), Form("七言律诗", 7, 8))
}
ALIASES = {"5-quatrain": "五言绝句", "7-quatrain": "七言绝句", "5-regulated": "五言律诗", "7-regulated": "七言律诗"}
_LINE = re.compile(f"^([{HAN}]+){COMMA}([{HAN}]+){FULL_STOP}$")


def form_named(name: str) -> Form:
    """The form with this Chinese name or English alias; a UserError naming the known ones otherwise."""
    form = FORMS.get(ALIASES.get(name, name))
    if form is None:
        known = ", ".join(f"{chinese} ({english})" for english, chinese in ALIASES.items())
        raise UserError(f"unknown poem form '{name}'; known forms: {known}")
    return form


def form_of(body: str) -> Form | None:
    """The regulated form `body` is written in, or None (irregular lines, another length or line count)."""
    rows = body.split("\n")
    lengths = set()
    for row in rows:
        match = _LINE.match(row)
        if match is None:
            return None
        lengths.update(len(half) for half in match.groups())
    if len(lengths) != 1:
        return None
    shape = (lengths.pop(), 2 * len(rows))
    return next((form for form in FORMS.values() if (form.line_length, form.line_count) == shape), None)


def line_ends(body: str) -> list[str]:
    """The last character of every line (both halves of each text line), in order."""
    return [half[-1] for row in body.split("\n") for half in re.split(f"[{COMMA}{FULL_STOP}]", row) if half]


def split_poem(text: str) -> tuple[str, str]:
    """(title, body) of a chinese-poetry document ("title author" on the first line, then the lines)."""
    header, _, body = text.partition("\n")
    title = header.rsplit(" ", 1)[0] if " " in header else header
    return title.strip(), body.strip()


@functools.cache
def _pinyin():
    try:
        import pypinyin
    except ImportError:
        raise UserError("rhyme groups need the pypinyin package: pip install pypinyin==0.55.0") from None
    return pypinyin


def rhyme_group(character: str) -> str:
    """The rhyme group of one Han character: its pinyin final without the medial ("" when it has none)."""
    pypinyin = _pinyin()
    [final] = pypinyin.lazy_pinyin(character, style=pypinyin.Style.FINALS, strict=True)
    if len(final) > 1 and final[0] in "iuv" and final not in ("in", "ing", "un", "vn"):
        final = final[1:]  # uang -> ang, iou -> ou, ie -> e, uei -> ei
    return {"in": "en", "vn": "en", "un": "en", "ing": "eng", "iong": "ong"}.get(final, final)


def rhymes(body: str) -> bool | None:
    """Whether every even line of `body` ends in the first even line's rhyme group (None with fewer than 2)."""
    ends = line_ends(body)[1::2]
    if len(ends) < 2:
        return None
    return len({rhyme_group(character) for character in ends}) == 1
