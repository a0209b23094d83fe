"""Knowledge distillation (https://arxiv.org/abs/1503.02531): a smaller decoder learns from a teacher's logits.

The student shares the teacher's tokenizer and trains on the same text with
loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy,
where _T is a softmax at temperature T (the T^2 keeps the gradient scale of the
soft term independent of T). The report sets student and teacher side by side:
parameters, validation perplexity and bits per character, and greedy decoding
speed measured in interleaved rounds on this machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import option
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.perplexity import evaluate_source
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import LM, load, read_generation_config
from lmforge.models import load_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.causal_lm import training_windows, window_training
from lmforge.tasks.chat import linked_model
from lmforge.tasks.examples import TaskData, report_folders, write_task_report
from lmforge.train.objectives import distillation_loss
from lmforge.train.trainer import TrainConfig

SPLIT_FRACTIONS = (0.01, 0.01)  # pretraining's validation and test shares, so the teacher never saw them


@dataclass
class Recipe:
    data: TaskData = option(TaskData(source="builtin:peoples-daily"), "text to distil on (split as in pretraining)")
    teacher: str | None = option(None, "the teacher decoder (run folder)")
    context: int = option(256, "tokens per training window")
    model: DecoderConfig = option(
        DecoderConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352), "the student's shape"
    )
    temperature: float = option(2.0, "softmax temperature of the soft targets")
    alpha: float = option(0.5, "weight of the distillation term; 1 - alpha goes to the ordinary LM loss")
    train: TrainConfig = option(
        TrainConfig(max_steps=300, batch_size=8, lr=2e-3, warmup_steps=30, eval_every=100, save_every=100),
        "optimisation",
    )
    eval_windows: int = option(64, "validation windows for perplexity")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")


@torch.inference_mode()
def decoding_speed(lms: dict[str, LM], new_tokens: int = 64, rounds: int = 5) -> dict[str, float]:
    """Greedy tokens/s of each model on the same prompt, in interleaved rounds; the median per model."""
    timings: dict[str, list[float]] = {name: [] for name in lms}
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    for _ in range(rounds):
        for name, lm in lms.items():
            prompt = [lm.encode_prompt("中国人民")]
            started = time.perf_counter()
            generated = generate_ids(lm.model, prompt, config, pad_id=lm.tokenizer.pad_id)[0].token_ids
            timings[name].append(len(generated) / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in timings.items()}


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """A new student beside the frozen teacher, on the teacher's tokenizer and pretraining's token windows."""
    if not recipe.teacher:
        raise UserError("distillation needs a teacher: --teacher RUN_FOLDER (e.g. runs/demo)")
    teacher = load_model(recipe.teacher, setup.device)
    if not isinstance(teacher, Decoder):
        raise UserError(f"{recipe.teacher} is not a decoder; distillation here is for decoders")
    teacher.requires_grad_(False)
    tokenizer = Tokenizer.load(recipe.teacher)
    recipe.model.vocab_size = teacher.config.vocab_size
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.context)
    config = recipe.train
    train_windows, valid_windows = training_windows(
        recipe.data.source, tokenizer, recipe.context, SPLIT_FRACTIONS, config.seed, setup.progress
    )
    torch.manual_seed(config.seed)
    student = Decoder(recipe.model).to(setup.device)
    print(
        f"distilling a {teacher.num_parameters():,}-parameter teacher into a "
        f"{student.num_parameters():,}-parameter student on {setup.device}"
    )
    return window_training(
        student,
        tokenizer,
        (train_windows, valid_windows),
        config,
        setup.device,
        recipe.eval_windows,
        task_info={"task": "distill", "teacher": str(recipe.teacher)},
        max_length=recipe.model.max_position_embeddings,
        title=f"distillation on {recipe.data.source}",
        objective_options={"teacher": teacher, "temperature": recipe.temperature, "alpha": recipe.alpha},
        generation=read_generation_config(recipe.teacher),
    )


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "valid",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    max_windows: int = 64,
) -> dict:
    """Student beside teacher: parameters, perplexity and bits per character on `split`, greedy decoding speed."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    teacher_dir = linked_model(RunFolder(model_dir).read_task(default={}), "teacher")
    if teacher_dir is None:
        raise UserError(f"{model_dir} names no teacher folder that exists (task.json 'teacher')")
    lms = {"student": load(model_dir), "teacher": load(teacher_dir)}
    rows = []
    speeds = decoding_speed(lms)
    for name, lm in lms.items():
        scores = evaluate_source(lm, data.source, split, max_windows)
        rows.append(
            (
                f"{name} ({model_dir if name == 'student' else teacher_dir})",
                {**scores, "parameters": lm.model.num_parameters(), "tokens_per_second": speeds[name]},
            )
        )
    student, teacher = rows[0][1], rows[1][1]
    metrics = {
        "perplexity": student["perplexity"],
        "bits_per_char": student["bits_per_char"],
        "parameters": student["parameters"],
        "size_ratio": student["parameters"] / teacher["parameters"],
        "speedup": student["tokens_per_second"] / teacher["tokens_per_second"],
        "baselines": {"teacher": {k: teacher[k] for k in ("perplexity", "bits_per_char", "parameters")}},
    }
    columns = [
        ("parameters", "parameters"),
        ("perplexity", "perplexity"),
        ("bits_per_char", "bits per character"),
        ("tokens_per_second", "greedy tokens/s (median of 5 interleaved rounds)"),
    ]
    notes = [
        f"Student: {metrics['size_ratio']:.0%} of the teacher's parameters, {metrics['speedup']:.2f}x its decoding "
        f"speed; perplexity on the {split} split of {data.source} (split as in pretraining, first {max_windows} "
        "windows of the model's context)."
    ]
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(
            f"Distillation took {training_minutes:.1f} minutes. Training curve: ![loss]({RunFolder.LOSS_PLOT})"
        )
    samples = [
        {
            "prompt": prompt,
            **{name: lm.generate(prompt, temperature=0.0, max_new_tokens=30) for name, lm in lms.items()},
        }
        for prompt in ("中国人民", "今年经济工作的")
    ]
    write_task_report(
        out_dir, f"distill — {model_dir}", metrics, rows, columns, samples, f"{data.source} ({split} split)", notes
    )
    return metrics


TASK = Task(
    name="distill",
    Recipe=Recipe,
    fields=("text",),
    family="decoder",
    objective=distillation_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
    eval_split="valid",
)
