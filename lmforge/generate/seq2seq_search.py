"""Greedy search, sampling and beam search for the encoder-decoder (`lmforge.models.seq2seq.Seq2Seq`).

The source is encoded once and each decoder layer's cross-attention keys and
values are projected once; every step then feeds one token per row through the
decoder's self-attention `KVCache`. Rows (greedy, samples) or sources (beam) that finish
leave the batch, so later steps only pay for live work. Token ids in, token ids
out, without bos or eos; padding, tokenizers and text live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.generate.sampling import SamplingConfig, next_tokens


def _room(model: nn.Module, max_new_tokens: int) -> int:
    """Generating n tokens feeds bos plus n - 1 of them, n decoder positions in all."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    return min(max_new_tokens, model.config.max_position_embeddings)


def ban_repeated_ngrams(logits: torch.Tensor, histories: list[list[int]], size: int) -> None:
    """In place: rule out every token that would repeat an n-gram of `size` tokens already in its row's history.

    logits (rows, V), histories[row] the tokens that row has generated. This is Hugging Face's
    `no_repeat_ngram_size`, the standard cure for the loops a small summarizer falls into ("总理总理总理").
    """
    if size <= 0:
        return
    for row, history in enumerate(histories):
        if len(history) < size - 1:
            continue
        prefix = history[len(history) - size + 1 :] if size > 1 else []
        banned = [
            history[start + size - 1]
            for start in range(len(history) - size + 1)
            if history[start : start + size - 1] == prefix
        ]
        if banned:
            logits[row, banned] = float("-inf")


def _keep_rows(rows: torch.Tensor, memory_kv, source_mask):
    """Index the cross-attention keys/values and the source mask by batch row."""
    memory_kv = [(key[rows], value[rows]) for key, value in memory_kv]
    return memory_kv, source_mask[rows] if source_mask is not None else None


def _decode_rows(
    model: nn.Module,
    memory_kv,
    source_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    no_repeat_ngram_size: int,
) -> list[list[int]]:
    """One token per row per step, chosen by `pick` from the logits (rows, V) -> (rows,), until eos or the limit."""
    batch, device = memory_kv[0][0].shape[0], memory_kv[0][0].device
    outputs: list[list[int]] = [[] for _ in range(batch)]
    cache = model.new_cache(batch, max_new_tokens)
    sources = list(range(batch))  # which output each live row writes
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model.decode(tokens[:, None], memory_kv, source_mask, cache=cache)[:, -1]  # (rows, V)
        ban_repeated_ngrams(logits, [outputs[source] for source in sources], no_repeat_ngram_size)
        tokens = pick(logits)  # (rows,)
        live = []
        for row, (source, token) in enumerate(zip(sources, tokens.tolist())):
            if token != eos_id:
                outputs[source].append(token)
                live.append(row)
        if not live:
            break
        if len(live) < len(sources):
            rows = torch.tensor(live, device=tokens.device)
            cache.reorder(rows)
            memory_kv, source_mask = _keep_rows(rows, memory_kv, source_mask)
            tokens = tokens[rows]
            sources = [sources[row] for row in live]
    return outputs


@torch.inference_mode()
def greedy_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """Right-padded sources (B, S) -> each row's most likely next token, step by step, until eos or the limit."""
    memory_kv = model.cross_kv(model.encode(input_ids, attention_mask), input_ids)
    return _decode_rows(
        model, memory_kv, attention_mask, bos_id, eos_id, _room(model, max_new_tokens),
        lambda logits: logits.argmax(dim=-1), no_repeat_ngram_size,
    )  # fmt: skip


@torch.inference_mode()
def sample_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    num_samples: int,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[list[int]]]:
    """Right-padded sources (B, S) -> `num_samples` outputs per source, each token drawn from softmax(logits / T).

    The sources are encoded once; their cross-attention keys and values are then repeated for the samples.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, not {num_samples}")
    sampling = SamplingConfig(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0)
    memory_kv = model.cross_kv(model.encode(input_ids, attention_mask), input_ids)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(num_samples)
    memory_kv, source_mask = _keep_rows(rows, memory_kv, attention_mask)
    outputs = _decode_rows(
        model, memory_kv, source_mask, bos_id, eos_id, _room(model, max_new_tokens),
        lambda logits: next_tokens(logits, sampling, generator=generator), no_repeat_ngram_size,
    )  # fmt: skip
    return [outputs[start : start + num_samples] for start in range(0, len(outputs), num_samples)]


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """Right-padded sources (B, S) -> the best hypothesis per source from a search keeping `num_beams` beams.

    A hypothesis scores sum(log-probs) / length**length_penalty, its length
    counting the generated tokens with eos (as Hugging Face's beam scorer); one
    cut off at `max_new_tokens` counts its tokens only and competes too.
    NOTE: a source stops as soon as its best finished hypothesis cannot be beaten
    by any live beam (Hugging Face's `early_stopping="never"` bound, measured
    against the best rather than the K-th best since we return one), so stopping
    early never changes the answer. The price: with length_penalty > 0 a live
    beam might still win by growing to `max_new_tokens`, so the search often
    runs that long. With num_beams=1 and length_penalty <= 0 this is greedy search.
    """
    batch, beams = input_ids.shape[0], num_beams
    vocab_size = model.config.vocab_size
    if not 1 <= num_beams <= vocab_size // 2:
        raise ValueError(f"num_beams must be in [1, vocab_size / 2 = {vocab_size // 2}], not {num_beams}")
    max_new_tokens = _room(model, max_new_tokens)
    device = input_ids.device
    memory_kv = model.cross_kv(model.encode(input_ids, attention_mask), input_ids)
    # Row s * K + k holds beam k of source s; beams never move to another source, so cross K/V rows stay put.
    rows = torch.arange(batch, device=device).repeat_interleave(beams)
    memory_kv, source_mask = _keep_rows(rows, memory_kv, attention_mask)
    cache = model.new_cache(batch * beams, max_new_tokens)
    best: list[tuple[float, list[int]]] = [(float("-inf"), [])] * batch  # best finished (score, tokens) per source
    active = list(range(batch))  # the sources still searching, in row order
    beam_scores = torch.zeros(batch, beams, device=device)  # (A, K) sum of log-probs
    beam_scores[:, 1:] = float("-inf")  # all beams start as the same [bos]; let only the first one expand
    sequences = torch.empty(batch * beams, 0, dtype=torch.long, device=device)  # (A * K, step)
    tokens = torch.full((batch * beams,), bos_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = model.decode(tokens[:, None], memory_kv, source_mask, cache=cache)[:, -1].float()  # (A * K, V)
        if no_repeat_ngram_size > 0:
            ban_repeated_ngrams(logits, sequences.tolist(), no_repeat_ngram_size)
        scores = beam_scores.view(-1, 1) + logits.log_softmax(dim=-1)  # (A * K, V)
        # 2K candidates per source: at most K end in eos (one per beam), so K live ones always remain.
        top_scores, top_indices = scores.view(len(active), beams * vocab_size).topk(2 * beams, dim=1)  # (A, 2K)
        top_beams, top_tokens = top_indices // vocab_size, top_indices % vocab_size
        is_eos = top_tokens == eos_id
        # NOTE: as in Hugging Face, eos only counts among the top K candidates.
        for index, rank in is_eos[:, :beams].nonzero().tolist():
            row = index * beams + int(top_beams[index, rank])
            _offer(best, active[index], float(top_scores[index, rank]) / (step + 1) ** length_penalty, sequences[row])
        live = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :beams]  # (A, K) best non-eos
        beam_scores = top_scores.gather(1, live)
        tokens = top_tokens.gather(1, live).view(-1)  # (A * K,)
        parents = (torch.arange(len(active), device=device)[:, None] * beams + top_beams.gather(1, live)).view(-1)
        sequences = torch.cat([sequences[parents], tokens[:, None]], dim=1)
        if step + 1 == max_new_tokens:
            break
        # Log-probs only fall, so a live beam's best future score is at the longest length when length_penalty > 0
        # and at the shortest (one more token, eos) otherwise.
        reachable_length = max_new_tokens if length_penalty > 0 else step + 2
        bound = beam_scores.max(dim=1).values / reachable_length**length_penalty  # (A,)
        searching = [index for index, source in enumerate(active) if best[source][0] < float(bound[index])]
        if not searching:
            return [hypothesis for _, hypothesis in best]
        if len(searching) < len(active):
            kept = torch.tensor(searching, device=device)
            rows = (kept[:, None] * beams + torch.arange(beams, device=device)).view(-1)  # (A' * K,)
            memory_kv, source_mask = _keep_rows(rows, memory_kv, source_mask)
            beam_scores, tokens, sequences, parents = beam_scores[kept], tokens[rows], sequences[rows], parents[rows]
            active = [active[index] for index in searching]
        cache.reorder(parents)
    for index, source in enumerate(active):  # cut off at max_new_tokens: the live beams compete too
        beam = int(beam_scores[index].argmax())
        score = float(beam_scores[index, beam]) / max(max_new_tokens, 1) ** length_penalty
        _offer(best, source, score, sequences[index * beams + beam])
    return [hypothesis for _, hypothesis in best]


def _offer(best: list[tuple[float, list[int]]], source: int, score: float, sequence: torch.Tensor) -> None:
    """Keep `sequence` (step,) as the source's best finished hypothesis if it scores higher."""
    if score > best[source][0]:
        best[source] = (score, sequence.tolist())
