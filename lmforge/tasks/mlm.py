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

`objective: replaced_token_detection` trains ELECTRA instead
(https://arxiv.org/abs/2003.10555, `models/electra.py`): the same masks, filled
with tokens sampled from a small generator, and a discriminator that learns for
every token whether it was replaced. The run folder keeps the discriminator as
its encoder (that is what ELECTRA fine-tunes); the generator, needed only to
pretrain, lives in the checkpoints. NOTE: the generator's input is BERT's
80/10/10 corruption, the masks masked LM uses (whole_word too); ELECTRA's code
puts <mask> at 85% of the chosen tokens and leaves 15% as they are.
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
from lmforge.models.electra import Electra
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
from lmforge.train.objectives import masked_lm_loss, replaced_token_detection_loss, replaced_token_outputs
from lmforge.train.trainer import TrainConfig

FIELDS = ("text",)
Masking = Literal["token", "whole_word"]
PretrainingObjective = Literal["masked_lm", "replaced_token_detection"]
OBJECTIVE_NAMES = {"masked_lm": "masked-LM", "replaced_token_detection": "replaced-token detection (ELECTRA)"}


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
    objective: PretrainingObjective = option(
        "masked_lm",
        "masked_lm (BERT) or replaced_token_detection (ELECTRA: a small generator fills the masks, the encoder "
        "learns which tokens were replaced)",
    )
    generator_size: float = option(
        0.25, "replaced_token_detection: the generator's width as a share of the encoder's (ELECTRA: 1/4 to 1/3)"
    )
    discriminator_weight: float = option(
        50.0, "replaced_token_detection: lambda in loss = generator's MLM loss + lambda x discriminator's (ELECTRA: 50)"
    )
    train: TrainConfig = option(
        TrainConfig(max_steps=1000, batch_size=32, lr=5e-4, warmup_steps=100, eval_every=250, save_every=250),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if not 0 < self.generator_size <= 1:
            raise ValueError(f"generator_size must be in (0, 1], not {self.generator_size}")
        if not self.discriminator_weight > 0:
            raise ValueError(f"discriminator_weight must be > 0, not {self.discriminator_weight}")


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
    tokenizer: Tokenizer, probability: float, words: WordGroups | None, rows: list, rng, draws: bool = False
) -> dict[str, torch.Tensor]:
    """Masked rows; with `draws`, also the uniform draws (B, T) that pick ELECTRA's generator samples."""
    input_ids, attention_mask = pad_right(tokenizer, rows)
    word_starts = None if words is None else word_start_tensor(words, rows, input_ids.shape[1])
    corrupted, labels = mask_tokens(input_ids, attention_mask, tokenizer, probability, rng, word_starts)
    batch = {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}
    if draws:  # drawn after the masks, so the masks are those of masked LM with the same seed
        batch["draws"] = torch.from_numpy(rng.random(tuple(input_ids.shape), dtype=np.float32))
    return batch


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


def evaluate_replaced_tokens(
    model: Electra, batches: list[dict[str, torch.Tensor]], discriminator_weight: float
) -> dict[str, float]:
    """ELECTRA's losses and how well each half does, on fixed validation batches (the same masks and draws).

    loss = generator_loss + discriminator_weight x discriminator_loss, as in training; generator_accuracy is on
    the masked positions; discriminator_accuracy on every real token, and replaced_precision / recall / f1 take
    "replaced" as the positive class (replaced_share of the real tokens were replaced: 1 - replaced_share is the
    accuracy of calling every token original).
    """
    device = next(model.parameters()).device
    sums = dict.fromkeys(("generator_loss", "correct", "masked", "discriminator_loss", "right", "real"), 0.0)
    sums.update(dict.fromkeys(("true_positive", "predicted", "replaced"), 0.0))
    with evaluating(model):
        for batch in batches:
            outputs = replaced_token_outputs(model, {name: tensor.to(device) for name, tensor in batch.items()})
            logits, targets = outputs.generator_logits.float(), outputs.targets
            sums["generator_loss"] += F.cross_entropy(logits, targets, reduction="sum").item()
            sums["correct"] += (logits.argmax(-1) == targets).sum().item()
            sums["masked"] += len(targets)
            scores, replaced = outputs.discriminator_logits.float()[outputs.real], outputs.replaced[outputs.real]
            loss = F.binary_cross_entropy_with_logits(scores, replaced.float(), reduction="sum")
            sums["discriminator_loss"] += loss.item()
            predicted = scores > 0
            sums["right"] += (predicted == replaced).sum().item()
            sums["real"] += len(replaced)
            sums["true_positive"] += (predicted & replaced).sum().item()
            sums["predicted"] += predicted.sum().item()
            sums["replaced"] += replaced.sum().item()
    generator_loss = sums["generator_loss"] / max(sums["masked"], 1)
    discriminator_loss = sums["discriminator_loss"] / max(sums["real"], 1)
    precision = sums["true_positive"] / max(sums["predicted"], 1)
    recall = sums["true_positive"] / max(sums["replaced"], 1)
    return {
        "loss": generator_loss + discriminator_weight * discriminator_loss,
        "generator_loss": generator_loss,
        "generator_accuracy": sums["correct"] / max(sums["masked"], 1),
        "discriminator_loss": discriminator_loss,
        "discriminator_accuracy": sums["right"] / max(sums["real"], 1),
        "replaced_precision": precision,
        "replaced_recall": recall,
        "replaced_f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "replaced_share": sums["replaced"] / max(sums["real"], 1),
    }


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
    electra = recipe.objective == "replaced_token_detection"
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.head = "replaced_token" if electra else "mlm"  # the saved encoder's head
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.max_length)

    words = WordGroups(tokenizer) if recipe.masking == "whole_word" else None
    collate = functools.partial(_collate, tokenizer, recipe.mask_probability, words, draws=electra)
    batches = ExampleBatches(rows, recipe.train.batch_size, collate, seed=recipe.train.seed)
    valid_rng = np.random.default_rng(12345)  # the same masks (and generator draws) at every evaluation
    valid_batches = [collate(chunk, valid_rng) for chunk in in_batches(valid_rows, recipe.train.batch_size)]

    torch.manual_seed(recipe.train.seed)
    if electra:
        model = Electra(recipe.model, recipe.generator_size).to(setup.device)
        discriminator, generator = model.parameter_counts()
        print(f"ELECTRA: a {discriminator:,}-parameter encoder (the discriminator) and a generator of {generator:,} "
              f"more (embeddings shared) on {setup.device}; {len(rows):,} training rows")  # fmt: skip
        weight = recipe.discriminator_weight
        validate = functools.partial(evaluate_replaced_tokens, batches=valid_batches, discriminator_weight=weight)
        specific = {"objective": replaced_token_detection_loss, "objective_options": {"discriminator_weight": weight},
                    "saved_model": model.discriminator}  # fmt: skip
    else:
        model = Encoder(recipe.model).to(setup.device)
        print(f"encoder (masked LM): {model.num_parameters():,} parameters on {setup.device}; "
              f"{len(rows):,} training rows")  # fmt: skip
        validate, specific = functools.partial(evaluate_mlm, batches=valid_batches), {}
    return Training(
        model,
        tokenizer,
        batches.batch,
        validate,
        task_info={"task": "mlm", "masking": recipe.masking, "objective": recipe.objective},
        max_length=recipe.max_length,
        title=f"{OBJECTIVE_NAMES[recipe.objective]} pretraining on {recipe.data.source}",
        **specific,
    )


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "valid",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    """Validation results before and after training, from metrics.jsonl: masked-token loss and accuracy, or for
    ELECTRA the discriminator's loss, accuracy and replaced-token F1 beside the generator's."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    run = RunFolder(model_dir)
    validations = validation_records(run)
    before, after = validations[0], validations[-1]
    objective = run.read_task({}).get("objective", "masked_lm")
    if objective == "replaced_token_detection":
        metrics = {"discriminator_loss": after["discriminator_loss"], "replaced_f1": after["replaced_f1"],
                   "discriminator_accuracy": after["discriminator_accuracy"],
                   "discriminator_loss_before": before["discriminator_loss"],
                   "generator_accuracy": after["generator_accuracy"]}  # fmt: skip
        columns = [("loss", "loss"), ("discriminator_loss", "discriminator loss"),
                   ("discriminator_accuracy", "discriminator accuracy"), ("replaced_f1", "replaced-token F1"),
                   ("replaced_share", "replaced share"), ("generator_accuracy", "generator accuracy")]  # fmt: skip
        note = ("Validation on the same masked positions and generator draws at every evaluation; the loss is the "
                "generator's masked-LM loss plus its weight times the discriminator's. The run folder's model is the "
                "discriminator.")  # fmt: skip
    else:
        metrics = {"masked_loss": after["loss"], "masked_accuracy": after["accuracy"],
                   "masked_loss_before": before["loss"]}  # fmt: skip
        columns = [("loss", "masked-token loss"), ("perplexity", "perplexity"), ("accuracy", "accuracy")]
        note = "Validation on the same masked positions at every evaluation."
    metrics = {"task": "mlm", "objective": objective, "steps": after["step"], **metrics,
               "training_minutes": training_minutes}  # fmt: skip
    write_task_report(
        out_dir,
        f"{OBJECTIVE_NAMES[objective]} pretraining — {model_dir}",
        metrics,
        [(f"step {r['step']}", r) for r in (before, after)],
        columns,
        [],
        f"{data.source}, the {split} shards of `lmforge data prepare`"
        if is_prepared(data.source)
        else describe_split(data, split, "text"),
        [f"{note} ![loss]({RunFolder.LOSS_PLOT})"],
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
