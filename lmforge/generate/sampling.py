"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Works on a whole batch of rows at once; knows nothing about models or text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import option

# A temperature this small is greedy decoding (as in vLLM): dividing by it would overflow float32 to inf and NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(128, "tokens to generate at most")
    temperature: float = option(0.8, "softmax temperature; 0 means greedy decoding")
    top_k: int = option(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = option(0.95, "sample among the smallest set of tokens whose probability reaches p (1 = all)")
    repetition_penalty: float = option(
        1.1, "divide the logits of tokens already seen (CTRL, arXiv:1909.05858); 1 = off"
    )
    seed: int | None = option(None, "random seed for reproducible sampling")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0.01 <= self.repetition_penalty <= 100:
            raise ValueError(f"repetition_penalty must be between 0.01 and 100, not {self.repetition_penalty}")


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Positive logits are divided, negative multiplied, as in CTRL."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def prompt_tokens_seen(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens each left-padded prompt holds, padding excluded (what the repetition penalty sees)."""
    if attention_mask is not None:  # a padding column gets the row's last token, which is always real
        input_ids = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, input_ids, True)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (https://arxiv.org/abs/1904.09751); the most likely token always survives."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches p.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop_sorted[..., 0] = False  # even a p that rounds to 0 in float32 keeps one token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def candidates(
    logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, V) -> (probabilities (B, K), their token ids (B, K), or None when K is the whole vocabulary).

    Top-k first: the nucleus is then found among k sorted values, never by sorting the vocabulary.
    """
    logits = logits.float()
    if seen is not None:
        logits = penalize_repetition(logits, seen, config.repetition_penalty)
    logits = logits / config.temperature
    ids = None
    if 0 < config.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, config.top_k, dim=-1)
    return filter_top_p(logits, config.top_p).softmax(dim=-1), ids


def draw(probabilities: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None = None):
    """One token id per row from `candidates`' output."""
    choice = torch.multinomial(probabilities, 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def next_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if config.temperature < GREEDY_BELOW:
        if seen is not None:
            logits = penalize_repetition(logits.float(), seen, config.repetition_penalty)
        return logits.argmax(dim=-1)
    return draw(*candidates(logits, config, seen), generator)


def next_tokens_per_row(
    logits: torch.Tensor,
    configs: list[SamplingConfig],
    seen: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,), each row with its own sampling settings and random generator.

    Rows that share settings are filtered together (one top-k and nucleus for the group); rows that
    then share a generator (or have none) draw together, and a row with its own generator (a seeded
    request) draws alone, so its tokens do not depend on its neighbours.
    """
    generators = generators or [None] * len(configs)
    groups: dict[tuple, list[int]] = {}
    for row, config in enumerate(configs):
        groups.setdefault((config.temperature, config.top_k, config.top_p, config.repetition_penalty), []).append(row)
    if len(groups) == 1 and len({id(generator) for generator in generators}) == 1:
        return next_tokens(logits, configs[0], seen, generators[0])  # the common case: no gathering, no scattering
    tokens = torch.empty(len(configs), dtype=torch.long, device=logits.device)  # (B,)
    for rows in groups.values():
        config = configs[rows[0]]
        index = torch.tensor(rows, device=logits.device)
        rows_seen = seen[index] if seen is not None else None
        if config.temperature < GREEDY_BELOW:
            tokens[index] = next_tokens(logits[index], config, rows_seen)
            continue
        # NOTE: filtering once per group, not once per seeded row, keeps 8 seeded clients as cheap as one batch.
        probabilities, ids = candidates(logits[index], config, rows_seen)  # (rows, K) each
        draws: dict[int, list[int]] = {}
        for position, row in enumerate(rows):
            draws.setdefault(id(generators[row]), []).append(position)
        for positions in draws.values():
            picked = ids[positions] if ids is not None else None
            tokens[index[positions]] = draw(probabilities[positions], picked, generators[rows[positions[0]]])
    return tokens
