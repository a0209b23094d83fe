"""Causal-LM pretraining as a task: a tokenizer, token windows of a corpus, a decoder, next-token loss.

`lmforge pretrain` runs this task through `run_task`. The corpus is read
through `data.tokens.lm_windows` (a memory-mapped token cache, or the shards of
`lmforge data prepare`); `training_windows` and `window_training` are
shared with distillation, so both read corpora the same way. The report
compares validation loss, perplexity and bits per character/byte before and
after training.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict, load_yaml, merge, option
from lmforge.data.sources import SPLITS, read_records, read_split, record_text, split_key, split_of
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, MixedWindows, is_prepared, lm_windows
from lmforge.device import autocast_dtype
from lmforge.errors import UserError
from lmforge.evaluate.perplexity import evaluate_lm
from lmforge.generate.sampling import SamplingConfig
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training, validation_records
from lmforge.tasks.examples import report_folders, write_task_report
from lmforge.train.distributed import broadcast, main_first, world
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig

COLUMNS = [
    ("loss", "loss (nats/token)"),
    ("perplexity", "perplexity"),
    ("bits_per_char", "bits per character"),
    ("bits_per_byte", "bits per byte"),
]
SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}


@dataclass
class DataConfig:
    source: str = option(
        "builtin:peoples-daily", "builtin:NAME, a .txt/.jsonl/.csv/.parquet file, or a `lmforge data prepare` folder"
    )
    tokenizer: str | None = option(None, "folder with a trained tokenizer.json (default: train one)")
    vocab_size: int = option(8192, "vocabulary size when training a tokenizer")
    context: int = option(256, "tokens per training window")
    valid_fraction: float = option(0.01, "share of records held out for validation (by hash)")
    test_fraction: float = option(0.01, "share of records held out for testing (by hash)")
    mix: str = option(
        "", "a second corpus whose train split joins training (and the tokenizer's training), e.g. builtin:reviews"
    )
    mix_share: float = option(0.0, "share of every training batch drawn from `mix`; validation stays on `source`")

    def __post_init__(self) -> None:
        if self.mix and not 0 < self.mix_share < 1:
            raise UserError(f"data.mix_share must be between 0 and 1 when data.mix is set, not {self.mix_share}")


@dataclass
class PretrainRecipe:
    data: DataConfig = option(DataConfig(), "what to train on")
    model: DecoderConfig = option(DecoderConfig(), "the decoder's shape")
    train: TrainConfig = option(TrainConfig(), "optimisation")
    generation: SamplingConfig = option(SamplingConfig(), "sampling defaults saved with the model")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PretrainRecipe:
    values = load_yaml(path) if path else {}
    return from_dict(PretrainRecipe, merge(values, overrides or {}))


def prepare_tokenizer(data: DataConfig, out_dir: Path, progress: bool = True) -> Tokenizer:
    """The recipe's tokenizer, the run folder's own (on resume), or a new one trained on the train split."""
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer)
    if is_prepared(data.source):
        return Tokenizer.load(data.source)  # `lmforge data prepare` keeps the tokenizer it encoded with
    if RunFolder(out_dir).has_tokenizer():
        existing = Tokenizer.load(out_dir)
        if existing.vocab_size == data.vocab_size:
            return existing  # so a second run hits the token cache and starts training at once
    sources = [data.source, data.mix] if data.mix else [data.source]
    records = (read_split(source, "train", data.valid_fraction, data.test_fraction) for source in sources)
    texts = (record_text(record) for record in itertools.chain.from_iterable(records))
    return Tokenizer.train(texts, data.vocab_size, show_progress=progress)


def training_windows(
    source: str,
    tokenizer: Tokenizer,
    context: int,
    fractions: tuple[float, float],
    seed: int,
    progress: bool = True,
    mix: tuple[str, float] | None = None,
) -> tuple[LMWindows | MixedWindows, LMWindows]:
    """(training windows in a seeded order, validation windows) of a corpus; one process fills the token cache.

    `mix` (source, share): that share of every training batch comes from the train split of a second corpus.
    """
    with main_first():  # the others open it
        train_windows = lm_windows(source, "train", tokenizer, context, seed, *fractions, progress=progress)
        valid_windows = lm_windows(source, "valid", tokenizer, context, 0, *fractions, progress=progress)
        if mix is not None:
            mixed = lm_windows(mix[0], "train", tokenizer, context, seed + 1, *fractions, progress=progress)
    if len(train_windows) == 0 or len(valid_windows) == 0:
        raise UserError(_too_small(source, context, fractions, len(train_windows) == 0))
    if mix is None:
        return train_windows, valid_windows
    if len(mixed) == 0:
        raise UserError(_too_small(mix[0], context, fractions, True))
    return MixedWindows(train_windows, mixed, mix[1]), valid_windows


def _too_small(source: str, context: int, fractions: tuple[float, float], train_empty: bool) -> str:
    """Why a split has no window, in words: often not a small corpus but one with too few records to split."""
    split = "train" if train_empty else "valid"
    advice = "raise data.valid_fraction" if split == "valid" else "lower data.valid_fraction and data.test_fraction"
    if not is_prepared(source):
        counts = split_counts(source, fractions)
        total = sum(counts.values())
        if counts[split] == 0 and total:
            # Hash splits work per record: one long line is one record, and it lands in a single split.
            where = max(counts, key=counts.get)
            return (
                f"all {total:,} records of {source} fell in the {SPLIT_NAMES[where]} split, none in the "
                f"{SPLIT_NAMES[split]} split (each record goes to one split by a hash of its text, "
                f"{_share(split, fractions):.0%} to {SPLIT_NAMES[split]}); {SPLIT_NAMES[split]} needs at least one "
                "record: split the file into more lines or records "
                f"(e.g. one paragraph per line), or {advice}"
            )
        if total:
            return (
                f"the {SPLIT_NAMES[split]} split of {source} ({counts[split]:,} of {total:,} records) has at most "
                f"{context} tokens, less than one training window: {advice}, lower data.context, or give more text"
            )
    return (
        f"{source} is too small: each split needs more than {context} tokens "
        f"(train and validation take {_share('train', fractions):.0%} / {fractions[0]:.0%})"
    )


def _share(split: str, fractions: tuple[float, float]) -> float:
    return {"train": 1 - sum(fractions), "valid": fractions[0], "test": fractions[1]}[split]


def split_counts(source: str, fractions: tuple[float, float]) -> dict[str, int]:
    """How many records of `source` fall in each split."""
    counts = dict.fromkeys(SPLITS, 0)
    for number, record in enumerate(read_records(source), start=1):
        counts[split_of(split_key(record, where=f"{source} record {number}"), *fractions)] += 1
    return counts


def window_training(
    model: Decoder,
    tokenizer: Tokenizer,
    windows: tuple[LMWindows | MixedWindows, LMWindows],
    config: TrainConfig,
    device: torch.device,
    max_windows: int,
    **details,
) -> Training:
    """A decoder trained on token windows (pretraining, distillation): each process reads only its own rows of
    each batch, and validation is loss, perplexity and bits per byte/character on the first validation windows."""
    train_windows, valid_windows = windows
    here = world()
    batch_for = functools.partial(
        train_windows.training_batch, batch_size=config.batch_size, rank=here.rank, world_size=here.size
    )
    validate = functools.partial(
        evaluate_lm,
        windows=valid_windows,
        token_bytes=tokenizer.token_bytes(),
        batch_size=config.batch_size,
        max_windows=max_windows,
        autocast_dtype=autocast_dtype(device, config.precision),
    )
    return Training(model, tokenizer, batch_for, validate, batches_are_local=True, **details)


def shared_tokenizer(data: DataConfig, out_dir: Path, progress: bool) -> Tokenizer:
    """Rank 0 trains (or loads) the tokenizer; under torchrun the other ranks take it from rank 0."""
    here = world()
    tokenizer = prepare_tokenizer(data, out_dir, progress) if here.main else None
    shared = broadcast((tokenizer.to_str(), tokenizer.chat_template) if here.main else None)
    return tokenizer or Tokenizer.from_str(*shared)


def prepare(recipe: PretrainRecipe, setup: Setup) -> Training:
    data, config = recipe.data, recipe.train
    tokenizer = shared_tokenizer(data, setup.folder.path, setup.progress)
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, data.context)
    fractions = (data.valid_fraction, data.test_fraction)
    mix = (data.mix, data.mix_share) if data.mix else None
    train_windows, valid_windows = training_windows(
        data.source, tokenizer, data.context, fractions, config.seed, setup.progress, mix
    )
    torch.manual_seed(config.seed)
    model = Decoder(recipe.model).to(setup.device)
    print(
        f"decoder: {model.num_parameters():,} parameters on {setup.device}; "
        f"{len(train_windows.tokens):,} training tokens, {len(valid_windows.tokens):,} validation tokens"
    )
    return window_training(
        model,
        tokenizer,
        (train_windows, valid_windows),
        config,
        setup.device,
        config.eval_windows,
        task_info={"task": "pretrain"},
        max_length=recipe.model.max_position_embeddings,
        title=f"pretraining on {data.source}" + (f" with {data.mix_share:.0%} {data.mix}" if data.mix else ""),
        generation=recipe.generation,
    )


def evaluate_run(
    model_dir: str | Path,
    data: DataConfig,
    split: str = "valid",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    """Validation loss, perplexity and bits per character/byte before and after training, from metrics.jsonl."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    validations = validation_records(RunFolder(model_dir))
    before, after = validations[0], validations[-1]
    metrics = {
        "task": "pretrain",
        "steps": after["step"],
        **{key: after[key] for key, _ in COLUMNS},
        "before": before,
        "after": after,
        "training_minutes": training_minutes,
    }
    write_task_report(
        out_dir,
        f"pretraining — {model_dir}",
        metrics,
        [(f"step {record['step']}", record) for record in (before, after)],
        COLUMNS,
        [],
        f"{data.source}, the first windows of the {split} split (valid {data.valid_fraction:.0%} by hash)",
        [f"Training curve: ![loss]({RunFolder.LOSS_PLOT})"],
    )
    return metrics


TASK = Task(
    name="pretrain",
    Recipe=PretrainRecipe,
    fields=("text",),
    family="decoder",
    objective=causal_lm_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
    eval_split="valid",
)
