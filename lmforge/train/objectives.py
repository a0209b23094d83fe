"""Training objectives as loss functions: (model, batch) -> (mean loss, tokens in the batch).

The trainer knows nothing about what a batch holds; an objective does.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; batch = (inputs (B, T), targets (B, T)), targets < 0 are ignored."""
    inputs, targets = batch
    return model(inputs, targets=targets), targets.numel()


def chat_sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on assistant tokens only, over rows that pack several conversations.

    batch: input_ids, targets (B, T) with -100 wherever the next token is not an assistant's,
    segment_ids (B, T) keeping attention inside each conversation.
    """
    loss = model(batch["input_ids"], segment_ids=batch["segment_ids"], targets=batch["targets"])
    return loss, int((batch["segment_ids"] > 0).sum())  # tokens processed (for tokens/s), not only those scored
