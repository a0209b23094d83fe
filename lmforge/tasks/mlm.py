"""Masked-LM pretraining of an encoder (BERT's objective) on plain text.

Texts are cut into rows of `max_length` tokens; 15% of the tokens are chosen,
and of those 80% become `<mask>`, 10% a random token and 10% stay, as in BERT
(https://arxiv.org/abs/1810.04805). The loss is cross-entropy on the chosen
positions only. The result is the starting point for encoder fine-tuning
(`lmforge finetune --task sentiment --base RUN`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import option, to_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import pick_device
from lmforge.evaluate.report import plot_losses
from lmforge.models import save_model
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import read_jsonl, write_json
from lmforge.tasks.encoding import pad_right
from lmforge.tasks.examples import ExampleBatches, TaskData, describe_split, in_batches, task_records, write_task_report
from lmforge.train.trainer import TrainConfig, train

IGNORE = -100  # F.cross_entropy's ignore_index


@dataclass
class Recipe:
    data: TaskData = option(TaskData(source="builtin:peoples-daily", valid_fraction=0.01, test_fraction=0.01), "text")
    vocab_size: int = option(8192, "tokenizer size")
    model: EncoderConfig = option(EncoderConfig(head="mlm"), "encoder shape")
    max_length: int = option(128, "tokens per row, <bos> and <eos> included")
    mask_probability: float = option(0.15, "share of tokens the model must predict")
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
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Tokenizer, probability: float, rng
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 corruption -> (corrupted input_ids, labels with IGNORE where nothing is predicted)."""
    shape = tuple(input_ids.shape)
    draw = torch.from_numpy(rng.random(shape))
    candidates = attention_mask.bool() & (input_ids != tokenizer.bos_id) & (input_ids != tokenizer.eos_id)
    chosen = candidates & (draw < probability)
    labels = torch.where(chosen, input_ids, IGNORE)
    how = torch.from_numpy(rng.random(shape))
    corrupted = input_ids.clone()
    corrupted[chosen & (how < 0.8)] = tokenizer.mask_id
    random_positions = chosen & (how >= 0.8) & (how < 0.9)
    random_ids = torch.from_numpy(rng.integers(0, tokenizer.vocab_size, shape))
    corrupted[random_positions] = random_ids[random_positions]
    return corrupted, labels


def _collate(tokenizer: Tokenizer, probability: float, rows: list, rng) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right(tokenizer, rows)
    corrupted, labels = mask_tokens(input_ids, attention_mask, tokenizer, probability, rng)
    return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}


def masked_lm_loss(model: Encoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # (B, T, hidden)
    chosen = batch["labels"] != IGNORE
    # NOTE: the vocabulary projection runs on the ~15% chosen positions only: most of the work, saved.
    logits = model.mlm_head(hidden[chosen])  # (chosen, vocab)
    return F.cross_entropy(logits.float(), batch["labels"][chosen]), int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate_mlm(model: Encoder, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and accuracy on the masked positions of fixed validation batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        labels = batch["labels"].to(device)
        hidden = model.hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        chosen = labels != IGNORE
        logits = model.mlm_head(hidden[chosen]).float()
        total_loss += F.cross_entropy(logits, labels[chosen], reduction="sum").item()
        correct += (logits.argmax(-1) == labels[chosen]).sum().item()
        count += int(chosen.sum())
    model.train(was_training)
    loss = total_loss / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(count, 1)}


def finetune(recipe: Recipe, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(recipe.device)
    train_texts = [r["text"] for r in task_records(recipe.data, "train", ("text",))]
    valid_texts = [r["text"] for r in task_records(recipe.data, "valid", ("text",))]
    if (out_dir / "tokenizer.json").is_file() and resume:
        tokenizer = Tokenizer.load(out_dir)
    else:
        tokenizer = Tokenizer.train(train_texts, recipe.vocab_size, show_progress=progress)
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.head = "mlm"
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.max_length)
    tokenizer.save(out_dir, model_max_length=recipe.max_length)
    write_json(out_dir / "recipe.json", to_dict(recipe))

    collate = functools.partial(_collate, tokenizer, recipe.mask_probability)
    rows = text_rows(tokenizer, train_texts, recipe.max_length)
    batches = ExampleBatches(rows, recipe.train.batch_size, collate, seed=recipe.train.seed)
    valid_rows = text_rows(tokenizer, valid_texts, recipe.max_length)[: recipe.train.eval_windows * 4]
    valid_rng = np.random.default_rng(12345)  # the same masks at every evaluation
    valid_batches = [collate(chunk, valid_rng) for chunk in in_batches(valid_rows, recipe.train.batch_size)]

    torch.manual_seed(recipe.train.seed)
    model = Encoder(recipe.model).to(device)
    print(f"encoder (masked LM): {model.num_parameters():,} parameters on {device}; {len(rows):,} training rows")
    train(
        model,
        masked_lm_loss,
        batches.batch,
        recipe.train,
        out_dir,
        functools.partial(evaluate_mlm, batches=valid_batches),
        resume=resume,
        progress=progress,
    )
    save_model(out_dir, model)
    records = read_jsonl(out_dir / "metrics.jsonl")
    plot_losses(records, out_dir / "loss.png", title=f"masked-LM pretraining on {recipe.data.source}")
    validations = [r for r in records if "valid_loss" in r]
    before, after = validations[0], validations[-1]
    metrics = {
        "task": "mlm",
        "steps": after["step"],
        "masked_loss": after["valid_loss"],
        "masked_accuracy": after["valid_accuracy"],
        "masked_loss_before": before["valid_loss"],
        "training_minutes": max((r["elapsed"] for r in records if "elapsed" in r), default=0.0) / 60,
    }
    write_task_report(
        out_dir,
        f"masked-LM pretraining — {out_dir}",
        metrics,
        [(f"step {r['step']}", r) for r in (before, after)],
        [("valid_loss", "masked-token loss"), ("valid_perplexity", "perplexity"), ("valid_accuracy", "accuracy")],
        [],
        describe_split(recipe.data, "valid", "text"),
        ["Validation on the same masked positions at every evaluation. ![loss](loss.png)"],
    )
    return metrics
