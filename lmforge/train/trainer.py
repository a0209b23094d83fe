"""The one training loop: AdamW, warm-up + cosine decay, accumulation, clipping, autocast, eval, checkpoints.

Every objective (causal LM now; masked LM, seq2seq, SFT later) plugs in as a
loss function, and every data set as `batch_for(index)`: a pure function of the
micro-batch index, so a resumed run sees exactly the batches an uninterrupted
run would have. This module knows optimisation and bookkeeping, not what the
model or the batches are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import option
from lmforge.device import autocast, autocast_dtype
from lmforge.errors import UserError
from lmforge.train.checkpoint import (
    latest_checkpoint,
    load_best,
    read_best,
    read_checkpoint,
    save_best,
    save_checkpoint,
)
from lmforge.train.distributed import Replicas, barrier, broadcast, mean, rows_of_rank, world
from lmforge.train.logbook import Logbook

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
COUNT_KEYS = ("tokens", "bytes", "characters", "bits_per_byte")  # logged, too detailed for the progress line


@dataclass
class TrainConfig:
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = option(100, "steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto = bf16 autocast on CUDA, fp32 elsewhere")
    eval_every: int = option(100, "validate every N steps (0 = only at the end)")
    eval_windows: int = option(64, "validation windows per evaluation")
    save_every: int = option(200, "checkpoint every N steps (and always at the end)")
    keep_last: int = option(2, "checkpoints to keep")
    best_metric: str = option(
        "", "end with the weights of the best validation, e.g. valid_loss (lowest) or valid_rougeL (highest)"
    )
    seed: int = option(0, "seed for weights and data order")
    max_minutes: float = option(0.0, "stop early after this much wall time (0 = no limit)")
    compile: bool = option(False, "torch.compile the training step (faster steps after a one-off compile)")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer state (FSDP) instead of DDP")
    max_bad_steps: int = option(3, "steps in a row with a NaN/inf loss or gradient before rolling back to a checkpoint")
    rollback_lr_factor: float = option(0.5, "multiply the learning rate by this after each rollback")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, not {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError(f"train.rollback_lr_factor must be in (0, 1], not {self.rollback_lr_factor}")
        if self.best_metric and not self.best_metric.startswith("valid_"):
            raise ValueError(f"train.best_metric names a validation result, valid_NAME, not {self.best_metric!r}")


def better(metric: str, value: float, best: float) -> bool:
    """Losses and perplexities are better lower; every other validation result (accuracy, ROUGE, ...) higher."""
    lower_is_better = metric.endswith(("loss", "perplexity"))
    return value < best if lower_is_better else value > best


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # NOTE: the fused kernel updates all parameters in one pass; it exists for CPU and CUDA.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)


def train(
    model: nn.Module,
    objective: Objective,
    batch_for: Callable[[int], Any],
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    progress: bool = True,
    batches_are_local: bool = False,
) -> list[dict[str, Any]]:
    """Train `model` in place, logging to run_dir/metrics.jsonl; returns the metric records of this run.

    `batch_for(index)` gives the global micro-batch `index`; under torchrun each process keeps its own
    rows of it, or, with `batches_are_local`, `batch_for` reads only this process's rows itself.
    """
    run_dir = Path(run_dir)  # under torchrun, ranks other than 0 get a scratch folder of their own
    here = world()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device, config.precision)
    replicas = Replicas(model, config.fsdp)
    optimizer = build_optimizer(replicas.training, config)
    # NOTE: compiling the objective rather than the model leaves the model itself eager, so evaluation
    # and generation afterwards do not recompile for every new shape.
    step_loss_fn = torch.compile(objective) if config.compile else objective
    start_step, tokens_seen, lr_scale = 0, 0, 1.0

    def restore(checkpoint: str) -> dict[str, Any] | None:
        """Load a checkpoint (rank 0's choice) into model and optimizer; its trainer state, or None for none."""
        checkpoint = broadcast(checkpoint)
        if not checkpoint:
            return None
        # Rank 0 reads the checkpoint; the others receive their part from it.
        model_state, optimizer_state, state = read_checkpoint(Path(checkpoint)) if here.main else ({}, {}, {})
        replicas.load_full_state(_with_tied_copies(model, model_state), optimizer, optimizer_state)
        state, rng = broadcast((state, torch.get_rng_state()))
        torch.set_rng_state(rng)
        return state

    # Rollbacks go to checkpoints of this run only: the one resumed from, or one written since.
    last_checkpoint = str(latest_checkpoint(run_dir) or "") if resume and here.main else ""
    state = restore(last_checkpoint)
    if state is not None:
        start_step, tokens_seen, lr_scale = state["step"], state["tokens_seen"], state.get("lr_scale", 1.0)
    # On resume the logbook drops what was logged after the checkpoint: that work is about to be redone.
    logbook = Logbook(run_dir, resume_from_step=start_step if state else None)  # other ranks: their scratch

    records: list[dict[str, Any]] = []
    best = read_best(run_dir, config.best_metric) if config.best_metric and state is not None else None

    def log(record: dict[str, Any]) -> None:
        logbook.log(record)
        records.append(record)

    def validate(step: int) -> dict[str, float]:
        """Evaluate, log the results as valid_NAME, and keep the weights if they are the best so far."""
        nonlocal best
        # Every rank evaluates (FSDP needs them all; under DDP the others would only wait for rank 0).
        results = evaluate(replicas.evaluated)
        replicas.training.train()
        record = {"step": step, **{f"valid_{name}": value for name, value in results.items()}}
        log(record)
        if config.best_metric not in record:
            return results
        value = record[config.best_metric]
        improved = best is None or better(config.best_metric, value, best["value"])
        if broadcast(improved):  # rank 0 decides for all: gathering the weights takes every rank
            best = {"step": step, "metric": config.best_metric, "value": value}
            model_state = replicas.full_state()
            if here.main:
                save_best(run_dir, step, config.best_metric, value, _without_tied_copies(model, model_state))
        return results

    if evaluate is not None and start_step == 0:
        validate(0)
    replicas.training.train()
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and here.main),
        dynamic_ncols=True,
    )
    step, bad_in_a_row = start_step, 0
    while step < config.max_steps:
        lr = learning_rate(step, config) * lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            batch = batch_for(step * config.grad_accum + micro)
            batch = _to_device(batch if batches_are_local else rows_of_rank(batch), device)
            with autocast(device, amp_dtype):
                loss, num_tokens = step_loss_fn(replicas.training, batch)
            (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
            step_tokens += num_tokens
        step_loss = mean(step_loss)  # each rank's loss is over its own rows
        step_tokens = round(mean(step_tokens) * here.size)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(replicas.training.parameters(), max_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # A NaN/inf step would poison the weights and every step after it: skip it, and if it keeps
            # happening, go back to the last good checkpoint with a smaller learning rate.
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            log({"step": step + 1, "skipped": f"loss {step_loss}, gradient norm {grad_norm}", "lr": lr})
            if here.main:
                bar.write(f"step {step + 1}: loss {step_loss}, gradient norm {grad_norm}: not finite, step skipped")
            step += 1
            if bad_in_a_row >= config.max_bad_steps:
                state = restore(last_checkpoint)
                if state is None:
                    raise UserError(
                        f"the loss was not finite for {bad_in_a_row} steps in a row (up to step {step}) and there "
                        f"is no checkpoint to go back to: lower train.lr (now {config.lr}) or check the data"
                    )
                step, tokens_seen, bad_in_a_row = state["step"], state["tokens_seen"], 0
                lr_scale = state.get("lr_scale", 1.0) * config.rollback_lr_factor
                logbook.close()
                logbook = Logbook(run_dir, resume_from_step=step)
                log({"step": step, "rolled_back_to": step, "lr_scale": lr_scale})
                bar.reset(total=config.max_steps)
                bar.update(step)
                if here.main:
                    bar.write(f"rolled back to step {step}; learning rate now x{lr_scale:g}")
            continue
        bad_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        window_tokens += step_tokens
        now = time.perf_counter()
        tokens_per_second = window_tokens / max(now - window_start, 1e-9)
        if now - window_start > 2.0:  # a short moving window, so the bar shows current speed
            window_start, window_tokens = now, 0
        log(
            {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_second": tokens_per_second,
                "elapsed": now - started,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        out_of_time = config.max_minutes > 0 and now - started > config.max_minutes * 60
        last = step == config.max_steps or out_of_time
        if evaluate is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            results = validate(step)
            if here.main:
                bar.write(
                    f"step {step}: "
                    + ", ".join(f"valid {k} {v:.4g}" for k, v in results.items() if k not in COUNT_KEYS)
                )
        # Every rank decides alike: ranks disagreeing on the clock would leave one waiting for the others forever.
        out_of_time = broadcast(out_of_time)
        if last or out_of_time or step % config.save_every == 0:
            model_state, optimizer_state = replicas.full_state(), replicas.full_optimizer_state(optimizer)
            if here.main:
                model_state = _without_tied_copies(model, model_state)
                trainer_state = {"tokens_seen": tokens_seen, "lr_scale": lr_scale}
                saved = save_checkpoint(run_dir, step, model_state, optimizer_state, trainer_state, config.keep_last)
                last_checkpoint = str(saved)
            barrier()
        if out_of_time:
            if here.main:
                bar.write(f"stopping at step {step}: the {config.max_minutes}-minute budget is spent")
            break
    bar.close()
    model = replicas.finish()
    if best is not None and best["step"] != step and here.main:
        # Only the main process writes the run folder; the others have no best/ of their own.
        model.load_state_dict(_with_tied_copies(model, load_best(run_dir)))
        log({"step": step, "best_step": best["step"], f"best_{config.best_metric}": best["value"]})
        bar.write(
            f"ending with the weights of step {best['step']}, the best {config.best_metric} ({best['value']:.4g})"
        )
    logbook.close()
    model.eval()
    return records


def _without_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied weight is stored once, under its source's name."""
    for copy in model.tied_weights:
        state.pop(copy, None)
    return state


def _with_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored state with each tied copy put back (an empty state, as other ranks read, stays empty)."""
    for copy, source in model.tied_weights.items():
        if source in state:
            state[copy] = state[source]
    return state


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch
