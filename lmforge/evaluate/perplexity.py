"""Perplexity, bits per byte and bits per character of a causal LM on a token stream.

Bits per byte compares models with different tokenizers; bits per character is
the natural unit for Chinese. Both are exact: a byte-level BPE token always
stands for the same bytes, so every target token's bytes and characters
(UTF-8 lead bytes) can be counted without decoding text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.tokens import LMWindows, lm_windows
from lmforge.device import autocast, evaluating
from lmforge.errors import UserError


def text_units(token_bytes: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes per token id, characters per token id); a character is counted at its UTF-8 lead byte."""
    byte_counts = torch.tensor([len(piece) for piece in token_bytes], dtype=torch.float64)
    char_counts = torch.tensor(
        [sum(1 for byte in piece if byte & 0xC0 != 0x80) for piece in token_bytes], dtype=torch.float64
    )
    return byte_counts, char_counts


def evaluate_lm(
    model: nn.Module,
    windows: LMWindows,
    token_bytes: list[bytes],
    batch_size: int = 16,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss (nats/token), perplexity, bits per byte and bits per character over the first `max_windows` windows."""
    device = next(model.parameters()).device
    byte_counts, char_counts = text_units(token_bytes)
    total_nll, total_tokens, total_bytes, total_chars = 0.0, 0, 0.0, 0.0
    with evaluating(model):
        for inputs, targets in windows.evaluation_batches(batch_size, max_windows):  # (B, T), (B, T)
            with autocast(device, autocast_dtype):
                logits = model(inputs.to(device))  # (B, T, vocab)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
            total_bytes += byte_counts[targets].sum().item()
            total_chars += char_counts[targets].sum().item()
    if total_tokens == 0:
        raise ValueError("no evaluation windows: the evaluation split is shorter than one context")
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1.0),
        "bits_per_char": total_nll / math.log(2) / max(total_chars, 1.0),
        "tokens": total_tokens,
        "bytes": int(total_bytes),
        "characters": int(total_chars),
    }


def evaluate_source(lm, source: str, split: str = "valid", max_windows: int | None = None) -> dict[str, float]:
    """Evaluate an `LM` on one split of a data source, in windows of the model's full context.

    `source` is anything `lm_windows` reads: builtin:NAME, a file split by hash, a folder of train/valid/test
    files (the whole SPLIT file is evaluated) or a folder made by `lmforge data prepare`.
    """
    if split not in ("train", "valid", "test"):
        raise UserError(f"unknown split {split!r}; use train, valid or test")
    windows = lm_windows(source, split, lm.tokenizer, lm.model.config.max_position_embeddings)
    if len(windows) == 0:
        raise UserError(f"the {split} split of {source} is shorter than one context window")
    return evaluate_lm(lm.model, windows, lm.tokenizer.token_bytes(), max_windows=max_windows)
