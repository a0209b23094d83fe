"""The task interface and the one driver every training job goes through.

A task (one file in `tasks/`) states only what is specific to it, as a `Task`:
the recipe, the record fields it reads, the model family, the objective (a loss
from `train/objectives.py`), `prepare` (records -> model, tokenizer, training
batches and the validation run during training) and `evaluate_run` (the final
evaluation: metrics, baselines, report sections). `run_task` does everything
else once, the same way for every task: device, run folder, tokenizer,
`recipe.json` and `task.json`, the training loop, weights (and LoRA adapters),
generation settings, `loss.png` from every record of `metrics.jsonl` (resumed
runs too), `report.md` + `metrics.json`, and exact resume. This module knows the
order of a training job, not any task's data, model or metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.config import to_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import pick_device
from lmforge.evaluate.report import plot_losses
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import save_generation_config
from lmforge.models import save_model
from lmforge.models.lora import LoRAConfig, merge_lora
from lmforge.run_folder import RunFolder, atomic_write_bytes
from lmforge.train.distributed import world
from lmforge.train.lora import save_adapter
from lmforge.train.soup import train_soup
from lmforge.train.trainer import Objective, TrainConfig, train

Family = Literal["decoder", "encoder", "seq2seq"]


@dataclass(frozen=True)
class Setup:
    """What `run_task` hands a task's `prepare`: where the run lives, on what device, and whether it resumes."""

    folder: RunFolder
    device: torch.device
    resume: bool
    progress: bool

    def tokenizer(self, texts: Callable[[], Iterable[str]], vocab_size: int, **options) -> Tokenizer:
        """The run folder's own tokenizer when resuming (its ids match the checkpoint), else one trained on texts()
        (`options`: Tokenizer.train's, e.g. fill_in_the_middle)."""
        if self.resume and self.folder.has_tokenizer():
            return Tokenizer.load(self.folder.path)
        return Tokenizer.train(texts(), vocab_size, show_progress=self.progress, **options)

    def first_phase(
        self, model: nn.Module, objective: Objective, batch_for: Callable[[int], Any], config: TrainConfig, steps: int
    ) -> None:
        """Train `model` in place for `steps` of a task's own first phase (self-supervised pairs or questions), with
        the main phase's optimisation settings (`config`) but no clock, validation or best checkpoint of its own, in
        the run's `warm-up` folder with its own checkpoints, so a resumed run resumes or skips it too;
        `Training.warm_up`."""
        config = dataclasses.replace(config, max_steps=steps, eval_every=0, max_minutes=0.0, best_metric="")
        train(
            model,
            objective,
            batch_for,
            config,
            self.folder / RunFolder.WARM_UP,
            resume=self.resume,
            progress=self.progress,
        )
        model.train()


@dataclass
class Training:
    """What a task's `prepare` gives back: the task-specific pieces `run_task` trains, saves and reports."""

    model: nn.Module
    tokenizer: Tokenizer
    batch_for: Callable[[int], Any]  # micro-batch index -> batch, a pure function (exact resume)
    validate: Callable[[nn.Module], dict[str, float]] | None  # run during training, logged as valid_NAME
    task_info: dict[str, Any]  # task.json
    max_length: int  # the tokenizer's model_max_length
    title: str  # of loss.png
    objective_options: dict[str, Any] = field(default_factory=dict)  # bound to the task's objective
    generation: SamplingConfig | None = None  # sampling defaults, for families that generate
    lora: LoRAConfig | None = None  # adapters to save beside the merged weights
    batches_are_local: bool = False  # batch_for already reads only this process's rows (torchrun)
    evaluate_options: dict[str, Any] = field(default_factory=dict)  # extra arguments of the final evaluate_run
    warm_up: Callable[[], None] | None = None  # a first training phase of the task's own, timed with the rest
    objective: Objective | None = None  # the recipe's choice where the task offers several; else the Task's
    saved_model: nn.Module | None = None  # the part of `model` the run folder keeps (ELECTRA: its discriminator)


@dataclass(frozen=True)
class Task:
    """One task's specifics; everything common is `run_task`'s.

    evaluate_run(model_dir, data, split, out_dir, training_minutes, progress, **options) scores a run folder on a
    split and writes report.md and metrics.json (also what `lmforge eval --task` calls).
    """

    name: str
    Recipe: type  # dataclass with at least data, train and device
    fields: tuple[str, ...]  # the record fields the task reads
    family: Family
    objective: Objective  # from train/objectives.py
    prepare: Callable[[Any, Setup], Training]
    evaluate_run: Callable[..., dict[str, Any]]
    eval_split: str = "test"  # the split the final evaluation scores


def run_task(task: Task, recipe: Any, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train `task` from `recipe` into the run folder `out_dir`, save it, evaluate it; the evaluation's metrics.

    A run that fails before it has a checkpoint to resume from leaves `out_dir` as it found it: a folder it
    created is removed, files it added are deleted, files it overwrote get their old bytes back.
    """
    folder = RunFolder(out_dir)
    # A run resumed from a checkpoint keeps its folder whatever happens: no snapshot of a possibly large folder.
    resuming = resume and folder.checkpoints.is_dir() and any(folder.checkpoints.glob("step_*"))
    before = None if resuming else FolderState(folder)
    try:
        return _run_task(task, recipe, folder, resume, progress)
    except BaseException:
        if before is not None and not before.resumable(resume):
            before.restore()
        raise


def _run_task(task: Task, recipe: Any, folder: RunFolder, resume: bool, progress: bool) -> dict:
    folder.path.mkdir(parents=True, exist_ok=True)
    setup = Setup(folder, pick_device(recipe.device), resume, progress)
    training = task.prepare(recipe, setup)
    training.tokenizer.save(folder.path, model_max_length=training.max_length)
    folder.write_recipe(to_dict(recipe))
    folder.write_task(training.task_info)

    started = time.perf_counter()
    if training.warm_up is not None:
        training.warm_up()
    options = training.objective_options
    objective = training.objective or task.objective
    objective = functools.partial(objective, **options) if options else objective
    fit = train_soup if recipe.train.soup > 1 else train
    fit(
        training.model,
        objective,
        training.batch_for,
        recipe.train,
        folder.path,
        evaluate=training.validate,
        resume=resume,
        progress=progress,
        batches_are_local=training.batches_are_local,
    )
    minutes = (time.perf_counter() - started) / 60
    save_trained(folder, training, recipe)
    plot_losses(folder.read_metrics_log(), folder.loss_plot, title=training.title)
    return task.evaluate_run(
        folder.path, recipe.data, task.eval_split, folder.path, training_minutes=minutes, progress=progress,
        **training.evaluate_options,
    )  # fmt: skip


class FolderState:
    """What a run folder held before a run, so that a run failing with nothing to resume can put it back."""

    # What run_task and the trainer write before the first checkpoint into a folder that may already hold them.
    REWRITTEN = (RunFolder.TOKENIZER, RunFolder.TOKENIZER_CONFIG, RunFolder.RECIPE, RunFolder.TASK,
                 RunFolder.METRICS_LOG)  # fmt: skip

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        # The outermost folder of out_dir's path that does not exist yet: the run creates it, a failure removes it.
        missing = [path for path in (folder.path, *folder.path.parents) if not path.exists()]
        self.created = missing[-1] if missing else None
        self.paths = set(folder.path.rglob("*")) if not missing else set()
        self.saved = {name: (folder / name).read_bytes() for name in self.REWRITTEN if (folder / name).is_file()}
        self.checkpoints = self._checkpoints()

    def _checkpoints(self) -> set[str]:
        return {path.name for path in self.folder.checkpoints.glob("step_*")} if self.folder.path.is_dir() else set()

    def resumable(self, resume: bool) -> bool:
        """Whether the folder now holds a checkpoint of this run (one it wrote, or the one it resumed from)."""
        now = self._checkpoints()
        return bool(now - self.checkpoints) or (resume and bool(now))

    def restore(self) -> None:
        if not world().main:
            return  # the other ranks of a torchrun job write into scratch folders of their own
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        added = sorted(set(self.folder.path.rglob("*")) - self.paths, key=lambda path: len(path.parts))
        for path in added:  # outermost first: a new folder holds only new files
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for name, data in self.saved.items():
            path = self.folder / name
            if not path.is_file() or path.read_bytes() != data:
                atomic_write_bytes(path, data)


def save_trained(folder: RunFolder, training: Training, recipe: Any) -> None:
    """Weights (merged, plus adapters when LoRA was used) and, for families that generate, sampling defaults."""
    if training.lora is not None:
        save_adapter(folder.path, training.model, training.lora, base=str(recipe.base))
        merge_lora(training.model)  # the run folder also holds the merged model, so every command can use it as is
    save_model(folder.path, training.model if training.saved_model is None else training.saved_model)
    if training.generation is not None:
        save_generation_config(folder.path, training.generation, training.tokenizer)


def validation_records(folder: RunFolder) -> list[dict[str, float]]:
    """Every validation of a run (resumed parts included), as {name: value} without the valid_ prefix, plus step."""
    return [
        {"step": record["step"], **{k.removeprefix("valid_"): v for k, v in record.items() if k.startswith("valid_")}}
        for record in folder.read_metrics_log()
        if "valid_loss" in record
    ]
