"""Causal-LM pretraining from a recipe: tokenizer, token cache, decoder, the training loop, a run folder.

`pretrain(recipe, out_dir)` is what `lmforge pretrain` calls. It wires the
stages together; each stage does its own work in its own module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict, load_yaml, merge, option, to_dict
from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, is_prepared, split_tokens
from lmforge.device import autocast_dtype, pick_device
from lmforge.errors import UserError
from lmforge.evaluate.perplexity import evaluate_lm
from lmforge.evaluate.report import plot_losses
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import save_generation_config
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run_folder import read_jsonl, write_json
from lmforge.train.distributed import broadcast, main_first, world
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig, train


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
    if (out_dir / "tokenizer.json").is_file():
        existing = Tokenizer.load(out_dir)
        if existing.vocab_size == data.vocab_size:
            return existing  # so a second run hits the token cache and starts training at once
    texts = (
        record_text(record) for record in read_split(data.source, "train", data.valid_fraction, data.test_fraction)
    )
    return Tokenizer.train(texts, data.vocab_size, show_progress=progress)


@dataclass
class PretrainResult:
    model: Decoder
    tokenizer: Tokenizer
    records: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]


def pretrain(
    recipe: PretrainRecipe, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> PretrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, config = recipe.data, recipe.train
    device = pick_device(recipe.device)
    # Rank 0 trains (or loads) the tokenizer; under torchrun the other ranks take it from rank 0.
    here = world()
    tokenizer = prepare_tokenizer(data, out_dir, progress) if here.main else None
    shared = broadcast((tokenizer.to_str(), tokenizer.chat_template) if here.main else None)
    tokenizer = tokenizer or Tokenizer.from_str(*shared)
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, data.context)
    tokenizer.save(out_dir, model_max_length=recipe.model.max_position_embeddings)
    write_json(out_dir / "recipe.json", to_dict(recipe))

    split_args = (data.valid_fraction, data.test_fraction)
    with main_first():  # one process fills the token cache; the others open it
        train_tokens = split_tokens(data.source, "train", tokenizer, *split_args, progress=progress)
        valid_tokens = split_tokens(data.source, "valid", tokenizer, *split_args, progress=progress)
    train_windows = LMWindows(train_tokens, data.context, seed=config.seed)
    valid_windows = LMWindows(valid_tokens, data.context)
    if len(train_windows) == 0 or len(valid_windows) == 0:
        raise_short_data(data)

    torch.manual_seed(config.seed)
    model = Decoder(recipe.model).to(device)
    print(
        f"decoder: {model.num_parameters():,} parameters on {device}; "
        f"{len(train_windows.tokens):,} training tokens, {len(valid_windows.tokens):,} validation tokens"
    )
    evaluate = functools.partial(
        evaluate_lm,
        windows=valid_windows,
        token_bytes=tokenizer.token_bytes(),
        batch_size=config.batch_size,
        max_windows=config.eval_windows,
        autocast_dtype=autocast_dtype(device, config.precision),
    )
    records = train(
        model,
        causal_lm_loss,
        functools.partial(
            train_windows.training_batch, batch_size=config.batch_size, rank=here.rank, world_size=here.size
        ),
        config,
        out_dir,
        evaluate=evaluate,
        resume=resume,
        progress=progress,
        batches_are_local=True,
    )
    save_model(out_dir, model)
    save_generation_config(out_dir, recipe.generation, tokenizer)
    all_records = read_jsonl(out_dir / "metrics.jsonl")
    plot_losses(all_records, out_dir / "loss.png", title=f"pretraining on {data.source}")
    validations = [
        {name.removeprefix("valid_"): value for name, value in record.items() if name.startswith("valid_")}
        for record in all_records
        if "valid_loss" in record
    ]
    before, after = validations[0], validations[-1]
    return PretrainResult(model, tokenizer, records, before, after)


def raise_short_data(data: DataConfig):
    raise UserError(
        f"{data.source} is too small: each split needs more than {data.context} tokens "
        f"(train and validation take {1 - data.valid_fraction - data.test_fraction:.0%} / {data.valid_fraction:.0%})"
    )
