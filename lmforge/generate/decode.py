"""Prefill + decode over the KV cache for a batch of prompts of different lengths.

Prompts are left-padded so every row's next token sits in the last column; the
attention mask keeps padding invisible and position ids count real tokens only,
so each row decodes exactly as it would alone. Token ids in, token ids out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.generate.compiled import CompiledDecoding
from lmforge.generate.sampling import SamplingConfig, next_tokens, prompt_tokens_seen


@dataclass
class Generation:
    token_ids: list[int]  # new tokens, without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the context ran out)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T), attention_mask (B, T) or None when no row needs padding)."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    if all(len(prompt) == longest for prompt in prompts):
        return input_ids.to(device), None
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def stream_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    compiled: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token (None once a row has finished).

    A row finishes after yielding one of `stop_ids`. Stops at `max_new_tokens` or
    at the model's context length, whichever comes first. `compiled`: decode with
    `torch.compile`d steps (generate/compiled.py), the same tokens after a one-off compile.
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(prompt) for prompt in prompts)
    if longest >= context:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's context of {context}")
    max_new_tokens = min(config.max_new_tokens, context - longest)
    if max_new_tokens == 0:
        return
    device = model.embed_tokens.weight.device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch = len(prompts)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = prompt_tokens_seen(input_ids, attention_mask, model.config.vocab_size)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.new_cache(batch, longest + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    compiled_step = CompiledDecoding(model, cache, attention_mask, longest + max_new_tokens) if compiled else None
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, config, seen, generator)  # (B,)
        yield [None if done else token for token, done in zip(tokens.tolist(), finished.tolist())]
        finished |= torch.isin(tokens, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if compiled_step is not None:
            logits = compiled_step(tokens)
            continue
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        logits = model(tokens[:, None], attention_mask=attention_mask, cache=cache)[:, -1]


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    compiled: bool = False,
) -> list[Generation]:
    """Non-streaming form of `stream_ids`: the new tokens of every row and why each row stopped."""
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    stop = set(stop_ids)
    for step_tokens in stream_ids(model, prompts, config, stop_ids, pad_id, compiled):
        for row, token in enumerate(step_tokens):
            if token is None:
                continue
            if token in stop:
                reasons[row] = "stop"
            else:
                outputs[row].append(token)
    return [Generation(ids, reason) for ids, reason in zip(outputs, reasons)]
