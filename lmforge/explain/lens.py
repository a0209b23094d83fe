"""The logit lens (https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru): what a decoder would predict after each layer.

Each layer's residual stream goes through the model's own final norm and output layer; at the last layer this is
exactly the model's logits. Only the top-k tokens and the rank of the expected token are kept per layer, so a
large vocabulary never costs (layers x tokens x vocab) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.models.decoder import Decoder


@dataclass
class LogitLens:
    top_ids: torch.Tensor  # (L, T, k): the k likeliest next tokens after each layer, at each position
    top_probs: torch.Tensor  # (L, T, k)
    target_rank: torch.Tensor  # (L, T): rank (0 = top) of the expected next token; -1 where there is none
    last_logits: torch.Tensor  # (T, vocab): the lens at the last layer, i.e. the model's logits


@torch.no_grad()
def logit_lens(model: Decoder, input_ids: torch.Tensor, targets: torch.Tensor, top_k: int = 5) -> LogitLens:
    """One unpadded row: input_ids (T,), targets (T,) the token expected after each position (-100 = none)."""
    residuals: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _, __, out: residuals.append(out)) for layer in model.layers]
    try:
        model.hidden_states(input_ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    top_ids, top_probs, ranks = [], [], []
    known = targets >= 0
    for residual in residuals:  # each (1, T, hidden)
        logits = model.lm_head(model.norm(residual))[0].float()  # (T, vocab)
        probs = logits.softmax(-1)
        values, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (T, k)
        top_ids.append(ids)
        top_probs.append(values)
        target_logit = logits.gather(-1, targets.clamp(min=0)[:, None])  # (T, 1)
        rank = (logits > target_logit).sum(-1)  # (T,): tokens strictly likelier than the expected one
        ranks.append(torch.where(known, rank, -1))
    return LogitLens(torch.stack(top_ids), torch.stack(top_probs), torch.stack(ranks), logits)
