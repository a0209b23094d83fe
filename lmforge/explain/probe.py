"""What is explained: a padded batch of one model family's inputs and the scalar per row that attributions explain.

A classifier's score is the log-probability of a label; a decoder's and an encoder-decoder's, the summed
log-probability of a continuation. Rows are right-padded; every tensor in `Probe.batch` has the batch first,
so attribution can repeat rows (one per integration step) without knowing the family. This module knows
families, token ids and masks, not text: callers tokenize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.tokenizer import Tokenizer
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2Seq
from lmforge.train.objectives import sequence_logprobs, target_logprobs


@dataclass
class Probe:
    family: str  # decoder, encoder or seq2seq
    batch: dict[str, torch.Tensor]  # model inputs, each (B, ...)
    score: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> (B,) float32
    embedding: Callable[[nn.Module], nn.Embedding]  # the token embedding of `batch["input_ids"]`
    # (B, T) bool: the positions of input_ids that attributions cover (the prompt, the text, the source)
    attributed: torch.Tensor
    query_masks: dict[str, torch.Tensor]  # per attention stack: (B, T_query), 1 = a real query position
    baseline_id: int  # the token whose embedding is the attribution baseline: <pad>, which carries no meaning


def classifier_probe(tokenizer: Tokenizer, rows: list[list[int]], labels: list[int]) -> Probe:
    """Encoder rows `<bos> text <eos>` and the label index each row's score is the log-probability of."""
    input_ids, attention_mask = tokenizer.pad(rows, side="right")  # (B, T): positions count from column 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}
    return Probe(
        "encoder", batch, _classifier_score, lambda model: model.embeddings.word_embeddings,
        attention_mask.bool(), {"self": attention_mask}, tokenizer.pad_id,
    )  # fmt: skip


def _classifier_score(model: Encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, labels)
    return logits.float().log_softmax(-1).gather(1, batch["labels"][:, None])[:, 0]


def decoder_probe(tokenizer: Tokenizer, prompts: list[list[int]], continuations: list[list[int]]) -> Probe:
    """Prompt + continuation per row; the score is log p(continuation | prompt), attributed over the prompt."""
    input_ids, attention_mask = tokenizer.pad([p + c for p, c in zip(prompts, continuations)], side="right")
    targets = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T): position t predicts token t + 1
    prompt = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, (head, tail) in enumerate(zip(prompts, continuations)):
        targets[row, len(head) - 1 : len(head) + len(tail) - 1] = torch.tensor(tail)
        prompt[row, : len(head)] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}
    masks = {"self": attention_mask}
    return Probe("decoder", batch, sequence_logprobs, lambda model: model.embed_tokens, prompt, masks, tokenizer.pad_id)


def seq2seq_probe(tokenizer: Tokenizer, sources: list[list[int]], targets: list[list[int]]) -> Probe:
    """Source rows and target continuations; the score is log p(target | source), attributed over the source."""
    input_ids, attention_mask = tokenizer.pad(sources, side="right")  # (B, S)
    decoder_input_ids, decoder_attention_mask = tokenizer.pad([[tokenizer.bos_id, *t] for t in targets], "right")
    labels = torch.full_like(decoder_input_ids, IGNORE_INDEX)  # (B, T): [bos] + target predicts target
    for row, target in enumerate(targets):
        labels[row, : len(target)] = torch.tensor(target)
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask, "labels": labels,
    }  # fmt: skip
    masks = {"encoder": attention_mask, "decoder": decoder_attention_mask, "cross": decoder_attention_mask}
    return Probe(
        "seq2seq", batch, _seq2seq_score, lambda model: model.encoder.embeddings.word_embeddings,
        attention_mask.bool(), masks, tokenizer.pad_id,
    )  # fmt: skip


def _seq2seq_score(model: Seq2Seq, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(
        batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
    )  # (B, T, vocab)
    return target_logprobs(logits, batch["labels"])


def to_device(probe: Probe, device: torch.device) -> Probe:
    probe.batch = {name: tensor.to(device) for name, tensor in probe.batch.items()}
    probe.attributed = probe.attributed.to(device)
    probe.query_masks = {name: mask.to(device) for name, mask in probe.query_masks.items()}
    return probe
