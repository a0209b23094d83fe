"""Masked-LM pretraining of an encoder (BERT's objective) on plain text.

Texts are cut into rows of `max_length` tokens; 15% of the tokens are chosen,
and of those 80% become `<mask>`, 10% a random token and 10% stay, as in BERT
(https://arxiv.org/abs/1810.04805). With `masking: whole_word` the choice is
made per word (jieba's, see `data/words.py`) and takes all of a word's tokens,
so each token is still chosen with the same probability (Chinese BERT-wwm,
https://arxiv.org/abs/1906.08101). The loss is cross-entropy on the chosen
positions only. The result is the starting point for encoder fine-tuning
(`lmforge finetune --task sentiment --base RUN`). A folder made by `lmforge data
prepare` is read lazily instead: its tokenizer, and rows cut from its shards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import option
from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, ShardedTokens, is_prepared
from lmforge.data.words import WordGroups
from lmforge.device import evaluating
from lmforge.errors import UserError
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training, validation_records
from lmforge.tasks.encoding import pad_right
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import masked_lm_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("text",)
Masking = Literal["token", "whole_word"]


@dataclass
class Recipe:
    data: TaskData = option(
        TaskData(source="builtin:peoples-daily", valid_fraction=0.01, test_fraction=0.01),
        "text, or a `lmforge data prepare` folder (its shards and tokenizer; vocab_size is then the tokenizer's)",
    )
    vocab_size: int = option(8192, "tokenizer size")
    han_characters: bool = option(False, "every Chinese character its own token boundary (what qa's spans need)")
    model: EncoderConfig = option(EncoderConfig(head="mlm"), "encoder shape")
    max_length: int = option(128, "tokens per row, <bos> and <eos> included")
    mask_probability: float = option(0.15, "share of tokens the model must predict")
    masking: Masking = option("token", "token (BERT) or whole_word (all tokens of a jieba word together)")
    train: TrainConfig = option(
        TrainConfig(max_steps=1000, batch_size=32, lr=5e-4, warmup_steps=100, eval_every=250, save_every=250),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


def text_rows(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Every text as `<bos> piece <eos>` rows; a long text gives several rows rather than losing its tail."""
    body = max_length - 2
    rows = []
    for ids in tokenizer.encode_batch(texts):
        rows += [[tokenizer.bos_id, *ids[start : start + body], tokenizer.eos_id] for start in range(0, len(ids), body)]
    return rows


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Tokenizer,
    probability: float,
    rng,
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 corruption -> (corrupted input_ids, labels with IGNORE_INDEX where nothing is predicted).

    word_starts (B, T): the position of the first token of each token's word (`data.words.WordGroups`); given,
    a word's tokens are chosen together, then each is replaced 80/10/10 on its own.
    """
    shape = tuple(input_ids.shape)
    draw = torch.from_numpy(rng.random(shape))
    if word_starts is not None:
        draw = draw.gather(1, word_starts)  # every token takes its word's draw: P(chosen) stays `probability`
    candidates = attention_mask.bool() & (input_ids != tokenizer.bos_id) & (input_ids != tokenizer.eos_id)
    chosen = candidates & (draw < probability)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    how = torch.from_numpy(rng.random(shape))
    corrupted = input_ids.clone()
    corrupted[chosen & (how < 0.8)] = tokenizer.mask_id
    random_positions = chosen & (how >= 0.8) & (how < 0.9)
    random_ids = torch.from_numpy(rng.integers(0, tokenizer.vocab_size, shape))
    corrupted[random_positions] = random_ids[random_positions]
    return corrupted, labels


def word_start_tensor(words: WordGroups, rows: list[list[int]], width: int) -> torch.Tensor:
    """(B, width) first-token positions of each token's word; padding positions are their own words."""
    starts = torch.arange(width).repeat(len(rows), 1)
    for row, ids in enumerate(rows):
        starts[row, : len(ids)] = torch.tensor(words(ids))
    return starts


def _collate(
    tokenizer: Tokenizer, probability: float, words: WordGroups | None, rows: list, rng
) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right(tokenizer, rows)
    word_starts = None if words is None else word_start_tensor(words, rows, input_ids.shape[1])
    corrupted, labels = mask_tokens(input_ids, attention_mask, tokenizer, probability, rng, word_starts)
    return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}


def evaluate_mlm(model: Encoder, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and accuracy on the masked positions of fixed validation batches."""
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    with evaluating(model):
        for batch in batches:
            labels = batch["labels"].to(device)
            hidden = model.hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            chosen = labels != IGNORE_INDEX
            logits = model.mlm_head(hidden[chosen]).float()  # (chosen, vocab)
            total_loss += F.cross_entropy(logits, labels[chosen], reduction="sum").item()
            correct += (logits.argmax(-1) == labels[chosen]).sum().item()
            count += int(chosen.sum())
    loss = total_loss / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(count, 1)}


class StreamRows:
    """Rows of `length` tokens cut one after another from a token stream (a split of a prepared folder), read
    lazily: documents arrive as `<bos> text <eos>` and a row may hold the end of one and the start of the next."""

    def __init__(self, tokens: ShardedTokens, length: int) -> None:
        self.windows = LMWindows(tokens, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> list[int]:
        # A window holds length + 1 tokens; the last one starts the next row.
        return self.windows.window(index)[:-1].tolist()


def training_rows(recipe: Recipe, setup: Setup) -> tuple[Tokenizer, Sequence[list[int]], list[list[int]]]:
    """(tokenizer, training rows, validation rows): from the shards and tokenizer of a `lmforge data prepare`
    folder, or from the texts of any other source with a tokenizer trained on them."""
    valid_count = recipe.train.eval_windows * 4
    if is_prepared(recipe.data.source):
        tokenizer = Tokenizer.load(recipe.data.source)
        if tokenizer.mask_id is None:
            raise UserError(f"the tokenizer of {recipe.data.source} has no <mask> token; prepare it with lmforge's")
        train, valid = (StreamRows(ShardedTokens(recipe.data.source, split, tokenizer), recipe.max_length)
                        for split in ("train", "valid"))  # fmt: skip
        return tokenizer, train, [valid[index] for index in range(min(len(valid), valid_count))]
    train_texts = [r["text"] for r in task_records(recipe.data, "train", FIELDS)]
    valid_texts = [r["text"] for r in task_records(recipe.data, "valid", FIELDS)]
    tokenizer = setup.tokenizer(lambda: train_texts, recipe.vocab_size, han_characters=recipe.han_characters)
    rows = text_rows(tokenizer, train_texts, recipe.max_length)
    return tokenizer, rows, text_rows(tokenizer, valid_texts, recipe.max_length)[:valid_count]


def prepare(recipe: Recipe, setup: Setup) -> Training:
    tokenizer, rows, valid_rows = training_rows(recipe, setup)
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.head = "mlm"
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.max_length)

    words = WordGroups(tokenizer) if recipe.masking == "whole_word" else None
    collate = functools.partial(_collate, tokenizer, recipe.mask_probability, words)
    batches = ExampleBatches(rows, recipe.train.batch_size, collate, seed=recipe.train.seed)
    valid_rng = np.random.default_rng(12345)  # the same masks at every evaluation
    valid_batches = [collate(chunk, valid_rng) for chunk in in_batches(valid_rows, recipe.train.batch_size)]

    torch.manual_seed(recipe.train.seed)
    model = Encoder(recipe.model).to(setup.device)
    print(f"encoder (masked LM): {model.num_parameters():,} parameters on {setup.device}; {len(rows):,} training rows")
    return Training(
        model,
        tokenizer,
        batches.batch,
        functools.partial(evaluate_mlm, batches=valid_batches),
        task_info={"task": "mlm", "masking": recipe.masking},
        max_length=recipe.max_length,
        title=f"masked-LM pretraining on {recipe.data.source}",
    )


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "valid",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    """Masked-token loss and accuracy before and after training, on the validation masks of metrics.jsonl."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    validations = validation_records(RunFolder(model_dir))
    before, after = validations[0], validations[-1]
    metrics = {
        "task": "mlm",
        "steps": after["step"],
        "masked_loss": after["loss"],
        "masked_accuracy": after["accuracy"],
        "masked_loss_before": before["loss"],
        "training_minutes": training_minutes,
    }
    write_task_report(
        out_dir,
        f"masked-LM pretraining — {model_dir}",
        metrics,
        [(f"step {r['step']}", r) for r in (before, after)],
        [("loss", "masked-token loss"), ("perplexity", "perplexity"), ("accuracy", "accuracy")],
        [],
        f"{data.source}, the {split} shards of `lmforge data prepare`"
        if is_prepared(data.source)
        else describe_split(data, split, "text"),
        [f"Validation on the same masked positions at every evaluation. ![loss]({RunFolder.LOSS_PLOT})"],
    )
    return metrics


TASK = Task(
    name="mlm",
    Recipe=Recipe,
    fields=FIELDS,
    family="encoder",
    objective=masked_lm_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
    eval_split="valid",
)
