"""Batches for training: the seeded order examples are drawn in, and packed task batches.

`shuffled_indices` draws every item once per epoch in a seeded order, a pure function of the step,
which is what lets a resumed run replay the same data; `pack_documents` packs (ids, loss mask)
documents into rows with the targets and segment ids that keep attention inside each one.
Language-model token windows are `data/tokens.py`'s. This module knows token ids and arrays, not models.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=4)
def _epoch_order(seed: int, size: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def shuffled_indices(seed: int, size: int, first: int, count: int) -> list[int]:
    """The items of samples first .. first + count - 1 when every one of `size` items is drawn once per epoch,
    each epoch in its own seeded order: a pure function of its arguments, so resumed runs replay it exactly."""
    indices = []
    for sample in range(first, first + count):
        epoch, position = divmod(sample, size)
        indices.append(int(_epoch_order(seed, size, epoch)[position]))
    return indices


IGNORE_INDEX = -100


def pack_documents(documents: list[tuple[list[int], list[bool]]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack (ids, loss_mask) documents, in the given order, into rows of `length` tokens (first fit, no splitting).

    Returns input_ids, targets and segment_ids, each (rows, length). A target is
    the next token where that token carries loss and belongs to the same
    document, else IGNORE_INDEX; segment ids number the documents of a row from
    1 (0 = padding) so attention can be kept inside each one. Documents longer
    than `length` must be cut by the caller.
    """
    rows: list[list[int]] = []
    row_length = length
    for index, (ids, _) in enumerate(documents):
        if len(ids) > length:
            raise ValueError(f"document {index} has {len(ids)} tokens, more than the row length {length}")
        if row_length + len(ids) > length:
            rows.append([])
            row_length = 0
        rows[-1].append(index)
        row_length += len(ids)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((len(rows), length), dtype=np.int64)
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            ids, loss_mask = documents[index]
            end = start + len(ids)
            input_ids[row, start:end] = ids
            segment_ids[row, start:end] = segment
            # Position t predicts token t + 1: a target only where that next token carries loss.
            next_ids = np.asarray(ids[1:], dtype=np.int64)
            targets[row, start : end - 1] = np.where(np.asarray(loss_mask[1:], dtype=bool), next_ids, IGNORE_INDEX)
            start = end
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "segment_ids": torch.from_numpy(segment_ids),
    }
