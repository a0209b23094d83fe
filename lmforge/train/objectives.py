"""Training objectives as loss functions: (model, batch) -> (mean loss, tokens in the batch).

The trainer knows nothing about what a batch holds; an objective does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; batch = (inputs (B, T), targets (B, T)), targets < 0 are ignored."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss, targets.numel()
