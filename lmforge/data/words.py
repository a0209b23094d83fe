"""Chinese word boundaries over token ids: which tokens of a row make up one word (jieba's segmentation).

Whole-word masking (https://arxiv.org/abs/1906.08101, Chinese BERT-wwm) masks
every token of a word together: a byte-level BPE token is often a single
character, and a model that sees "北京大[mask]" learns the word's spelling, not
its meaning. Words come from `jieba` on the text the ids spell; the mapping back
to ids works on bytes, so it holds for any window of a token stream, even one
that starts or ends inside a character. A token that straddles two words (BPE
merges across word boundaries: "的老") joins them into one unit. jieba sits
behind this module only. This module knows ids, bytes and words, not masking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import accumulate

import jieba

from lmforge.data.tokenizer import Tokenizer

jieba.setLogLevel(logging.WARNING)  # not "Building prefix dict ..." on every first use


class WordGroups:
    """For the tokens of a row, the position of the first token of the word each belongs to."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.token_bytes = tokenizer.token_bytes()  # special tokens: b"", each their own unit

    def __call__(self, row: Sequence[int]) -> list[int]:
        """row of ids -> starts, starts[t] <= t; tokens t and u are in one unit exactly when starts[t] == starts[u]."""
        pieces = [self.token_bytes[int(token)] for token in row]
        starts = list(range(len(pieces)))
        run_start = 0
        for position in range(len(pieces) + 1):
            if position == len(pieces) or not pieces[position]:
                self._group(pieces, run_start, position, starts)
                run_start = position + 1
        return starts

    @staticmethod
    def _group(pieces: list[bytes], first: int, stop: int, starts: list[int]) -> None:
        """Group tokens first..stop-1 (none special): a token starts a unit when a word starts at its first byte."""
        if stop - first < 2:
            return
        # surrogateescape: a character cut by the window's edge stays one 1-byte character per byte.
        text = b"".join(pieces[first:stop]).decode("utf-8", errors="surrogateescape")
        char_bytes = [0, *accumulate(len(char.encode("utf-8", errors="surrogateescape")) for char in text)]
        word_starts = {char_bytes[start] for _, start, _ in jieba.tokenize(text)}
        offset = 0
        for position in range(first, stop):
            if position > first and offset not in word_starts:
                starts[position] = starts[position - 1]
            offset += len(pieces[position])
