"""Attention maps: every layer's and head's attention probabilities, recorded during one forward pass.

`layers.Attention` appends softmax(q k^T / sqrt(d)) to its `recorded` list while one is set; `record_attention`
sets them on one family's attention stacks (a decoder's or encoder's self-attention; an encoder-decoder's
encoder, decoder and cross-attention) and collects the maps. The normal, unrecorded path computes nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.models import family_of
from lmforge.models.layers import Attention


def attention_stacks(model: nn.Module) -> dict[str, list[Attention]]:
    """The attention modules of each stack, in layer order."""
    if family_of(model) in ("decoder", "encoder"):
        return {"self": [layer.self_attn for layer in model.layers]}
    return {
        "encoder": [layer.self_attn for layer in model.encoder.layers],
        "decoder": [layer.self_attn for layer in model.decoder_layers],
        "cross": [layer.cross_attn for layer in model.decoder_layers],
    }


@contextmanager
def record_attention(model: nn.Module, query_masks: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention of the forward pass run inside; on exit the dict holds, per stack, (L, B, H, T, S).

    `query_masks` (per stack, (B, T), 1 = real): rows of padding queries are set to 0, as are columns of padding
    keys already (the mask gives them probability 0).
    """
    stacks = attention_stacks(model)
    maps: dict[str, torch.Tensor] = {}
    for modules in stacks.values():
        for module in modules:
            module.recorded = []
    try:
        yield maps
        for name, modules in stacks.items():
            if any(len(module.recorded) != 1 for module in modules):
                raise RuntimeError("record_attention expects exactly one forward pass inside it")
            stacked = torch.stack([module.recorded[0] for module in modules])  # (L, B, H, T, S)
            maps[name] = stacked * query_masks[name][None, :, None, :, None].to(stacked.dtype)
    finally:
        for modules in stacks.values():
            for module in modules:
                module.recorded = None


def head_summary(maps: torch.Tensor, query_mask: torch.Tensor, special: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer and head (L, H), over one row's real queries: mean entropy (nats), mean distance |i - j| in
    positions (for self-attention), and the share of attention that goes to special tokens (<bos>, [CLS], ...).

    maps: (L, H, T, S) of one row; query_mask (T,) bool; special (S,) bool.
    """
    rows = maps[:, :, query_mask]  # (L, H, real T, S)
    entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (L, H)
    queries = torch.arange(maps.shape[2], device=maps.device)[query_mask]  # (real T,)
    keys = torch.arange(maps.shape[3], device=maps.device)
    distance = (rows * (queries[:, None] - keys[None, :]).abs()).sum(-1).mean(-1)  # (L, H)
    to_special = rows[..., special].sum(-1).mean(-1)  # (L, H)
    return {"entropy": entropy, "distance": distance, "special": to_special}
