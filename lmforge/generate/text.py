"""The text edge of decoding: one sequence's new token ids -> UTF-8-safe text pieces, cut at stop strings.

Every caller that shows text while it is generated goes through `TextStream`: `LM.generate` and
`LM.chat` (and so `lmforge chat`), and the server. Tokens are detokenized incrementally (never half a
UTF-8 character) and stop strings are matched on text, holding back any tail that could still become
one. The engine underneath (generate/engine.py) only sees token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.data.tokenizer import StreamDecoder, Tokenizer
from lmforge.generate.engine import Token


def stop_strings(stop: Sequence[str] | str | None) -> list[str]:
    """One stop string or many -> the non-empty ones."""
    if isinstance(stop, str):
        return [stop] if stop else []
    return [text for text in stop or [] if text]


class TextStream:
    """One sequence's new tokens -> text pieces.

    Ends at an end token ("stop"), a stop string ("stop"), or when the engine gives the
    sequence its last token or the caller calls `finish` ("length").
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | str | None, end_ids: set[int] | frozenset) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = stop_strings(stop)
        self.end_ids = end_ids
        self.pending = ""  # decoded text held back: it may be the start of a stop string
        self.finished = False
        self.finish_reason = "length"
        self.token_count = 0  # tokens generated, the end token included

    def feed(self, token: Token) -> str:
        """One engine step's token for this sequence -> the text now safe to show (all of it on the last token).

        When `finished` turns true on a token that the engine did not mark as the last, a stop string
        was hit: the caller removes the sequence from the engine.
        """
        piece = "" if token.token_id is None or self.finished else self.push(token.token_id)
        if token.finish_reason is not None:
            piece += self.finish()
        return piece

    def push(self, token: int) -> str:
        """Add one token; return the text now safe to emit."""
        self.token_count += 1
        if token in self.end_ids:
            self.finished, self.finish_reason = True, "stop"
            return split_at_stop(self.pending + self.decoder.flush(), self.stop_strings, final=True)[0]
        self.pending += self.decoder.push(token)
        piece, self.pending, hit = split_at_stop(self.pending, self.stop_strings)
        if hit:
            self.finished, self.finish_reason = True, "stop"
        return piece

    def finish(self) -> str:
        """End the stream where it is; return the text still held back."""
        if self.finished:
            return ""
        self.finished = True
        return split_at_stop(self.pending + self.decoder.flush(), self.stop_strings, final=True)[0]


def split_at_stop(text: str, stop_strings: list[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was hit)."""
    hits = [text.find(stop) for stop in stop_strings if stop in text]
    if hits:
        return text[: min(hits)], "", True
    if final:
        return text, "", False
    # Hold back the longest tail that is the start of some stop string: it may still complete.
    held = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return text[: len(text) - held], text[len(text) - held :], False
