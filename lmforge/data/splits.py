"""Train / validation / test splits by hash: which split a record falls in depends on its own key alone."""

from __future__ import annotations

import hashlib
from typing import Literal

SPLITS = ("train", "valid", "test")
SPLIT_KEY = "split_key"  # a record's own split key, when it was made from another text (see sources.split_key)


def split_of(key: str, valid_fraction: float = 0.01, test_fraction: float = 0.01) -> Literal["train", "valid", "test"]:
    """Which split `key` belongs to, decided by its SHA-256 alone.

    Nothing depends on the other records, so adding text to a corpus never moves
    an existing record between train and evaluation.
    """
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    if position < valid_fraction:
        return "valid"
    if position < valid_fraction + test_fraction:
        return "test"
    return "train"
