"""The one training loop: AdamW or Muon, warm-up + cosine decay, accumulation, clipping, autocast, eval, checkpoints.

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
from lmforge.device import autocast, choose_precision
from lmforge.errors import UserError
from lmforge.train.checkpoint import (
    average_checkpoints,
    latest_checkpoint,
    load_best,
    read_best,
    read_checkpoint,
    save_best,
    save_checkpoint,
)
from lmforge.train.distributed import Replicas, barrier, broadcast, mean, rows_of_rank, world
from lmforge.train.logbook import Logbook
from lmforge.train.optim import build_optimizer

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
COUNT_KEYS = ("tokens", "bytes", "characters", "bits_per_byte")  # logged, too detailed for the progress line


@dataclass
class TrainConfig:
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw", "adamw, or muon: Muon for the matrices inside the blocks, AdamW for embeddings, norms and heads"
    )
    lr: float = option(1e-3, "peak learning rate (of AdamW)")
    muon_lr: float = option(0.02, "peak learning rate of Muon (optimizer muon), scheduled like lr")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = option(
        "original",
        "Muon's per-shape scaling: original = update spectral norm muon_lr at any width; "
        "match_rms_adamw = update RMS like AdamW's (then muon_lr ~ lr)",
    )
    muon_weight_decay: float = option(0.0, "Muon's decoupled weight decay (the matrices shrink by muon_lr x this)")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = option(100, "steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "auto = bf16 autocast on CUDA, and on a CPU where a probe measures bf16 matmuls faster; else fp32"
    )
    eval_every: int = option(100, "validate every N steps (0 = only at the end)")
    eval_windows: int = option(64, "validation windows per evaluation")
    save_every: int = option(200, "checkpoint every N steps (and always at the end)")
    keep_last: int = option(2, "checkpoints to keep")
    best_metric: str = option(
        "", "end with the weights of the best validation, e.g. valid_loss (lowest) or valid_rougeL (highest)"
    )
    average_last: int = option(
        1, "end with the mean weights of the last N checkpoints (at most keep_last; 1 = the final weights)"
    )
    seed: int = option(0, "seed for weights and data order")
    soup: int = option(
        1,
        "train this many members from the same start, each on its own data, and end with the mean of their "
        "weights (a model soup, train/soup.py); 1 = one run",
    )
    max_minutes: float = option(
        0.0, "stop after this much training time (0 = no limit); the learning-rate decay then ends there too"
    )
    compile: bool = option(False, "torch.compile the training step (faster steps after a one-off compile)")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer state (FSDP) instead of DDP")
    max_bad_steps: int = option(3, "steps in a row with a NaN/inf loss or gradient before rolling back to a checkpoint")
    rollback_lr_factor: float = option(0.5, "multiply the learning rate by this after each rollback")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "max_bad_steps", "soup"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, not {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError(f"train.rollback_lr_factor must be in (0, 1], not {self.rollback_lr_factor}")
        if self.best_metric and not self.best_metric.startswith("valid_"):
            raise ValueError(f"train.best_metric names a validation result, valid_NAME, not {self.best_metric!r}")
        if not 1 <= self.average_last <= self.keep_last or (self.average_last > 1 and self.best_metric):
            raise ValueError(f"train.average_last must be in [1, keep_last={self.keep_last}] and, above 1, cannot "
                             f"be combined with train.best_metric; not {self.average_last}")  # fmt: skip


def better(metric: str, value: float, best: float) -> bool:
    """Losses and perplexities are better lower; every other validation result (accuracy, ROUGE, ...) higher."""
    lower_is_better = metric.endswith(("loss", "perplexity"))
    return value < best if lower_is_better else value > best


def learning_rate(step: int, config: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps` or at the end of the
    time budget (`max_minutes`), whichever comes first."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.max_minutes > 0:
        # A run stopped by the clock must still end its decay: stopping mid-schedule at a high learning rate
        # leaves the loss well above what the same minutes give when the rate comes down in time.
        progress = max(progress, elapsed_seconds / (config.max_minutes * 60))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


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
    run = _Run(model, objective, batch_for, config, Path(run_dir), evaluate, resume, batches_are_local)
    if evaluate is not None and run.step == 0:
        run.validate(0)
    run.replicas.training.train()
    # The time budget and tokens/s count training, not the first validation; a resumed run continues its clock.
    run.started = time.perf_counter() - run.elapsed_before
    run.window_start, run.window_tokens = run.started, 0
    run.bar = tqdm(
        total=config.max_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=not (progress and run.here.main),
        dynamic_ncols=True,
    )
    run.write(f"precision: {run.precision}; optimizer: {run.optimizer_description()}")
    while run.step < config.max_steps:
        lr = run.set_learning_rate()
        step_loss, step_tokens, grad_norm = run.accumulate_gradients()
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            run.skip_step(lr, step_loss, grad_norm)
            continue
        run.bad_in_a_row = 0
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        out_of_time = run.log_step(lr, step_loss, step_tokens, grad_norm)
        last = run.step == config.max_steps or out_of_time
        if evaluate is not None and (last or (config.eval_every and run.step % config.eval_every == 0)):
            run.validate_and_print()
        # Every rank decides alike: ranks disagreeing on the clock would leave one waiting for the others forever.
        out_of_time = broadcast(out_of_time)
        if last or out_of_time or run.step % config.save_every == 0:
            run.save_checkpoint()
        if out_of_time:
            run.write(f"stopping at step {run.step}: the {config.max_minutes}-minute budget is spent")
            break
    run.bar.close()
    return run.finish()


class _Run:
    """The state of one `train()` call and its steps: optimizer, counters, logbook, best validation, checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        batch_for: Callable[[int], Any],
        config: TrainConfig,
        run_dir: Path,  # under torchrun, ranks other than 0 get a scratch folder of their own
        evaluate: Callable[[nn.Module], dict[str, float]] | None,
        resume: bool,
        batches_are_local: bool,
    ) -> None:
        self.model, self.batch_for, self.config, self.run_dir = model, batch_for, config, run_dir
        self.evaluate, self.batches_are_local = evaluate, batches_are_local
        self.here = world()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = next(model.parameters()).device
        # Every rank trains in rank 0's precision: two probes could disagree on a close call.
        self.precision = broadcast(choose_precision(self.device, config.precision))
        self.amp_dtype = self.precision.dtype
        self.replicas = Replicas(model, config.fsdp)
        self.optimizer = build_optimizer(self.replicas.training, config)
        # NOTE: compiling the objective rather than the model leaves the model itself eager, so evaluation
        # and generation afterwards do not recompile for every new shape.
        self.step_loss_fn = torch.compile(objective) if config.compile else objective
        self.step, self.tokens_seen, self.lr_scale, self.bad_in_a_row, self.elapsed_before = 0, 0, 1.0, 0, 0.0
        # Rollbacks go to checkpoints of this run only: the one resumed from, or one written since.
        self.last_checkpoint = str(latest_checkpoint(run_dir) or "") if resume and self.here.main else ""
        state = self.restore(self.last_checkpoint)
        if state is not None:
            self.step, self.tokens_seen, self.lr_scale = state["step"], state["tokens_seen"], state.get("lr_scale", 1.0)
            self.elapsed_before = state.get("elapsed_seconds", 0.0)
        # On resume the logbook drops what was logged after the checkpoint: that work is about to be redone.
        self.logbook = Logbook(run_dir, resume_from_step=self.step if state else None)  # other ranks: their scratch
        # How this run trains, for the reports (not a step's record: callers get those back).
        self.logbook.log(
            {"step": self.step, "precision": str(self.precision), "optimizer": self.optimizer_description()}
        )
        self.records: list[dict[str, Any]] = []
        resumed_best = config.best_metric and state is not None
        self.best = read_best(run_dir, config.best_metric) if resumed_best else None
        self.started = self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.bar: tqdm | None = None

    def optimizer_description(self) -> str:
        config = self.config
        if len(self.optimizer.parts) == 1:
            return f"AdamW (lr {config.lr:g})"
        muon = self.optimizer.parts[1]
        matrices = sum(len(group["params"]) for group in muon.param_groups)
        newton_schulz = "bf16" if muon.newton_schulz_dtype == torch.bfloat16 else "fp32"
        return (
            f"Muon (lr {config.muon_lr:g}, {config.muon_adjust_lr}, Newton-Schulz in {newton_schulz}) for {matrices} "
            f"hidden matrices, AdamW (lr {config.lr:g}) for the rest"
        )

    def restore(self, checkpoint: str) -> dict[str, Any] | None:
        """Load a checkpoint (rank 0's choice) into model and optimizer; its trainer state, or None for none."""
        checkpoint = broadcast(checkpoint)
        if not checkpoint:
            return None
        # Rank 0 reads the checkpoint; the others receive their part from it.
        model_state, optimizer_state, state = read_checkpoint(Path(checkpoint)) if self.here.main else ({}, {}, {})
        self.replicas.load_full_state(_with_tied_copies(self.model, model_state), self.optimizer, optimizer_state)
        state, rng = broadcast((state, torch.get_rng_state()))
        torch.set_rng_state(rng)
        return state

    def log(self, record: dict[str, Any]) -> None:
        self.logbook.log(record)
        self.records.append(record)

    def write(self, line: str) -> None:
        """A line above the progress bar, from the main process only."""
        if self.here.main:
            self.bar.write(line)

    def validate(self, step: int) -> dict[str, float]:
        """Evaluate, log the results as valid_NAME, and keep the weights if they are the best so far."""
        # Every rank evaluates (FSDP needs them all; under DDP the others would only wait for rank 0).
        results = self.evaluate(self.replicas.evaluated)
        self.replicas.training.train()
        record = {"step": step, **{f"valid_{name}": value for name, value in results.items()}}
        self.log(record)
        metric = self.config.best_metric
        if metric not in record:
            return results
        value = record[metric]
        improved = self.best is None or better(metric, value, self.best["value"])
        if broadcast(improved):  # rank 0 decides for all: gathering the weights takes every rank
            self.best = {"step": step, "metric": metric, "value": value}
            model_state = self.replicas.full_state()
            if self.here.main:
                save_best(self.run_dir, step, metric, value, _without_tied_copies(self.model, model_state))
        return results

    def validate_and_print(self) -> None:
        results = self.validate(self.step)
        shown = ", ".join(f"valid {k} {v:.4g}" for k, v in results.items() if k not in COUNT_KEYS)
        self.write(f"step {self.step}: {shown}")

    def set_learning_rate(self) -> float:
        """Every optimizer's rate for this step (the schedule scales each one's peak alike); AdamW's, as logged."""
        # Rank 0's clock for all, so every rank steps at the same rate.
        elapsed = broadcast(time.perf_counter() - self.started) if self.config.max_minutes > 0 else 0.0
        scale = learning_rate(self.step, self.config, elapsed) / self.config.lr * self.lr_scale
        return self.optimizer.set_learning_rate(scale)[0]

    def accumulate_gradients(self) -> tuple[float, int, float]:
        """Forward and backward over the step's micro-batches, then clip: (mean loss, tokens, gradient norm)."""
        config, training = self.config, self.replicas.training
        step_loss, step_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            batch = self.batch_for(self.step * config.grad_accum + micro)
            batch = _to_device(batch if self.batches_are_local else rows_of_rank(batch), self.device)
            with autocast(self.device, self.amp_dtype):
                loss, num_tokens = self.step_loss_fn(training, batch)
            (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
            step_tokens += num_tokens
        step_loss = mean(step_loss)  # each rank's loss is over its own rows
        step_tokens = round(mean(step_tokens) * self.here.size)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(training.parameters(), max_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        return step_loss, step_tokens, grad_norm

    def skip_step(self, lr: float, step_loss: float, grad_norm: float) -> None:
        """Drop a step whose loss or gradient is not finite; after too many in a row, roll back."""
        # A NaN/inf step would poison the weights and every step after it: skip it, and if it keeps
        # happening, go back to the last good checkpoint with a smaller learning rate.
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.log({"step": self.step + 1, "skipped": f"loss {step_loss}, gradient norm {grad_norm}", "lr": lr})
        self.write(f"step {self.step + 1}: loss {step_loss}, gradient norm {grad_norm}: not finite, step skipped")
        self.step += 1
        if self.bad_in_a_row >= self.config.max_bad_steps:
            self.roll_back()

    def roll_back(self) -> None:
        """Back to the last checkpoint of this run, with the learning rate scaled down."""
        state = self.restore(self.last_checkpoint)
        if state is None:
            raise UserError(
                f"the loss was not finite for {self.bad_in_a_row} steps in a row (up to step {self.step}) and there "
                f"is no checkpoint to go back to: lower train.lr (now {self.config.lr}) or check the data"
            )
        self.step, self.tokens_seen, self.bad_in_a_row = state["step"], state["tokens_seen"], 0
        self.lr_scale = state.get("lr_scale", 1.0) * self.config.rollback_lr_factor
        self.logbook.close()
        self.logbook = Logbook(self.run_dir, resume_from_step=self.step)
        self.log({"step": self.step, "rolled_back_to": self.step, "lr_scale": self.lr_scale})
        self.bar.reset(total=self.config.max_steps)
        self.bar.update(self.step)
        self.write(f"rolled back to step {self.step}; learning rate now x{self.lr_scale:g}")

    def log_step(self, lr: float, step_loss: float, step_tokens: int, grad_norm: float) -> bool:
        """Count, log and show a finished step; whether the time budget is spent."""
        self.tokens_seen += step_tokens
        self.window_tokens += step_tokens
        now = time.perf_counter()
        tokens_per_second = self.window_tokens / max(now - self.window_start, 1e-9)
        if now - self.window_start > 2.0:  # a short moving window, so the bar shows current speed
            self.window_start, self.window_tokens = now, 0
        self.log(
            {
                "step": self.step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": self.tokens_seen,
                "tokens_per_second": tokens_per_second,
                "elapsed": now - self.started,
            }
        )
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        return self.config.max_minutes > 0 and now - self.started > self.config.max_minutes * 60

    def save_checkpoint(self) -> None:
        model_state = self.replicas.full_state()
        optimizer_state = self.replicas.full_optimizer_state(self.optimizer)
        if self.here.main:
            model_state = _without_tied_copies(self.model, model_state)
            elapsed = time.perf_counter() - self.started
            trainer_state = {"tokens_seen": self.tokens_seen, "lr_scale": self.lr_scale, "elapsed_seconds": elapsed}
            saved = save_checkpoint(
                self.run_dir, self.step, model_state, optimizer_state, trainer_state, self.config.keep_last
            )
            self.last_checkpoint = str(saved)
        barrier()

    def finish(self) -> list[dict[str, Any]]:
        """The trained model in eval mode (the best validation's weights when asked for); this run's records."""
        model = self.replicas.finish()
        best = self.best
        if best is not None and best["step"] != self.step and self.here.main:
            # Only the main process writes the run folder; the others have no best/ of their own.
            model.load_state_dict(_with_tied_copies(model, load_best(self.run_dir)))
            metric = self.config.best_metric
            self.log({"step": self.step, "best_step": best["step"], f"best_{metric}": best["value"]})
            self.bar.write(f"ending with the weights of step {best['step']}, the best {metric} ({best['value']:.4g})")
        if self.config.average_last > 1 and self.here.main:
            averaged, steps = average_checkpoints(self.run_dir, self.config.average_last)
            model.load_state_dict(_with_tied_copies(model, averaged))
            self.log({"step": self.step, "averaged_steps": steps})
            self.bar.write(f"ending with the mean weights of the checkpoints of steps {', '.join(map(str, steps))}")
        self.logbook.close()
        model.eval()
        return self.records


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
