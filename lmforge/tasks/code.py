"""Code completion: a decoder and a code tokenizer trained on Python files, left to right and fill-in-the-middle.

The corpus is the standard library of the Python running lmforge (`stdlib`, no download) or any folder of `.py`
files, split by file (data/code.py). The tokenizer is trained on the training files, so runs of spaces and
indentation become tokens; the report shows its characters per token on held-out code beside another tokenizer's
(`compare_tokenizer`, e.g. the Chinese demo's). Training documents are line-aligned chunks, rearranged for
fill-in-the-middle at `fim_rate` (StarCoder's PSM/SPM). The evaluation (evaluate/code_completion.py) scores the
next line and a hidden line on held-out files against two baselines, with 95% bootstrap intervals. Given a
HumanEval file instead (`lmforge eval --task code --data humaneval.jsonl --allow-code-execution`) it samples
completions and reports pass@k from running them in a sandbox (evaluate/execution.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import option
from lmforge.data.batches import pack_documents
from lmforge.data.code import CodeCorpus, line_chunks, python_files, training_ids
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate import code_completion as completion
from lmforge.evaluate.execution import Limits
from lmforge.evaluate.metrics import bootstrap_mean, paired_difference
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import load
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.chat import assistant_loss
from lmforge.tasks.examples import ExampleBatches, TaskData, report_folders, write_task_report
from lmforge.train.objectives import chat_sft_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("text",)
VALID_CHUNKS = 64
COLUMNS = [
    ("exact_match", "next line: exact match %"),
    ("edit_similarity", "next line: edit similarity"),
    ("parses", "next line: parses %"),
    ("fim_exact_match", "FIM: exact match %"),
    ("fim_parses", "FIM: parses %"),
]


@dataclass
class CorpusConfig:
    max_files: int = option(0, "read at most this many .py files (0 = all)")
    vocab_size: int = option(4096, "code tokenizer vocabulary")
    context: int = option(256, "tokens per training chunk")
    fim_rate: float = option(0.5, "share of training chunks rearranged for fill-in-the-middle (0 = left to right)")
    spm_rate: float = option(0.5, "share of those in SPM order (suffix first), the rest PSM")
    fim_line_rate: float = option(
        0.0, "share of those whose middle is 1-3 whole lines, not the text between two random characters"
    )
    compare_tokenizer: str | None = option(None, "folder of a tokenizer to compare characters per token with")

    def __post_init__(self) -> None:
        for name in ("fim_rate", "spm_rate", "fim_line_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)}")


@dataclass
class Recipe:
    data: TaskData = option(
        TaskData(source="stdlib", valid_fraction=0.05, test_fraction=0.05, max_eval_examples=500),
        "stdlib (this interpreter's standard library), a folder of .py files, or a HumanEval .jsonl to evaluate on",
    )
    corpus: CorpusConfig = option(CorpusConfig(), "how the code is read, tokenized and rearranged")
    model: DecoderConfig = option(
        DecoderConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, max_position_embeddings=256),
        "the decoder's shape",
    )
    train: TrainConfig = option(
        TrainConfig(max_steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, eval_every=250, save_every=250),
        "optimisation",
    )
    generation: SamplingConfig = option(SamplingConfig(temperature=0.2), "sampling defaults saved with the model")
    max_new_tokens: int = option(48, "completion length limit when scoring")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


def corpus_splits(data: TaskData, max_files: int) -> tuple[CodeCorpus, dict[str, list]]:
    corpus = python_files(data.source, max_files)
    splits = {name: corpus.split(name, data.valid_fraction, data.test_fraction) for name in ("train", "valid", "test")}
    for name, files in splits.items():
        if not files:
            raise UserError(f"no file of {data.source} fell in the {name} split ({len(corpus.files)} files; "
                            "raise data.valid_fraction / data.test_fraction or give more files)")  # fmt: skip
    return corpus, splits


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """A code tokenizer (with FIM tokens) and a decoder from scratch; chunks of the training files as batches."""
    corpus, splits = corpus_splits(recipe.data, recipe.corpus.max_files)
    config, settings = recipe.train, recipe.corpus
    tokenizer = setup.tokenizer(lambda: (f.text for f in splits["train"]), settings.vocab_size, fill_in_the_middle=True)
    room = settings.context - 8  # FIM markers, <bos>, <eos> and a re-tokenized seam or two
    chunks = [chunk for file in splits["train"] for chunk in line_chunks(tokenizer, file.text, room)]
    valid = [chunk for file in splits["valid"] for chunk in line_chunks(tokenizer, file.text, room)][:VALID_CHUNKS]
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, settings.context)
    torch.manual_seed(config.seed)
    model = Decoder(recipe.model).to(setup.device)
    print(f"code: {corpus.counts['files_seen']:,} files read ({_counts_text(corpus)}); {len(chunks):,} training "
          f"chunks; decoder of {model.num_parameters():,} parameters on {setup.device}")  # fmt: skip

    def collate(picked: list[str], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        documents = [training_ids(tokenizer, text, rng, settings.fim_rate, settings.spm_rate, settings.fim_line_rate)
                     for text in picked]  # fmt: skip
        documents = [(ids[: settings.context], [True] * min(len(ids), settings.context)) for ids in documents]
        return {k: torch.as_tensor(v) for k, v in pack_documents(documents, settings.context, tokenizer.pad_id).items()}

    valid_documents = [(ids[: settings.context], [True] * min(len(ids), settings.context))
                       for ids in tokenizer.encode_batch(valid, add_bos=True, add_eos=True)]  # fmt: skip
    valid_rows = {k: torch.as_tensor(v) for k, v in
                  pack_documents(valid_documents, settings.context, tokenizer.pad_id).items()}  # fmt: skip
    task_info = {"task": "code", "fim_rate": settings.fim_rate, "spm_rate": settings.spm_rate,
                 "fim_line_rate": settings.fim_line_rate, "files": dict(corpus.counts),
                 "compare_tokenizer": settings.compare_tokenizer}  # fmt: skip
    return Training(
        model,
        tokenizer,
        ExampleBatches(chunks, config.batch_size, collate, config.seed).batch,
        lambda model: assistant_loss(model, valid_rows),
        task_info,
        max_length=recipe.model.max_position_embeddings,
        title=f"code completion on {recipe.data.source}",
        generation=recipe.generation,
        evaluate_options={"max_new_tokens": recipe.max_new_tokens, "max_files": recipe.corpus.max_files},
    )


def _counts_text(corpus: CodeCorpus) -> str:
    return ", ".join(f"{value:,} {name.replace('_', ' ')}" for name, value in sorted(corpus.counts.items()))


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    max_new_tokens: int = 48,
    max_files: int = 0,
    allow_code_execution: bool = False,
    samples: int = 1,
    temperature: float = 0.0,
) -> dict:
    """Next-line and FIM scores on held-out files, or pass@k when `data.source` is a HumanEval .jsonl file."""
    if data.source.endswith(".jsonl"):
        return evaluate_humaneval(model_dir, data, out_dir, allow_code_execution, samples, temperature, max_new_tokens)
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    corpus, splits = corpus_splits(data, max_files)
    examples = completion.line_examples(splits[split], data.max_eval_examples or 500)
    predictions = completion.complete_lines(lm, examples, max_new_tokens)
    scores = completion.score_lines(examples, predictions)
    systems = {"lmforge code model (greedy)": scores}
    for name, lines in completion.baseline_lines(examples, splits["train"]).items():
        systems[f"baseline: {name}"] = completion.score_lines(examples, lines)
    if lm.tokenizer.fim_ids is not None:
        middles = completion.complete_middles(lm, examples, max_new_tokens)
        fim = completion.score_lines(examples, middles)
        scores.update({"fim_exact_match": fim["exact_match"], "fim_parses": fim["parses"]})
    rows = [(name, _summary(columns)) for name, columns in systems.items()]
    metrics = {**rows[0][1], "examples": len(examples), "files": dict(corpus.counts)}
    headline = ("exact_match", "edit_similarity")
    metrics["intervals"] = {key: _percent(key, bootstrap_mean(scores[key])) for key in headline}
    metrics["baselines"] = {
        name.removeprefix("baseline: "): {
            **values,
            "difference": {key: _percent(key, paired_difference(scores[key], systems[name][key])) for key in headline},
        }
        for name, values in rows[1:]
    }
    metrics["tokenizer"] = tokenizer_comparison(lm.tokenizer, splits[split], RunFolder(model_dir).read_task(default={}))
    notes = _notes(metrics, training_minutes)
    gallery = [{"line before": e.previous[:60], "reference": e.target[:60], "model": p.strip()[:60]}
               for e, p in list(zip(examples, predictions))[:10]]  # fmt: skip
    write_task_report(out_dir, f"code completion — {model_dir}", metrics, rows, COLUMNS, gallery,
                      f"{data.source}: {len(splits[split])} {split} files (split by a hash of the file path)",
                      notes)  # fmt: skip
    return metrics


def _summary(columns: dict[str, list[float]]) -> dict[str, float]:
    """Means in percent (edit similarity is already 0..100); parse rates over the examples that have one."""
    summary = {}
    for key, values in columns.items():
        values = [value for value in values if not math.isnan(value)]
        mean = float(np.mean(values)) if values else float("nan")
        summary[key] = mean if key == "edit_similarity" else 100 * mean
    return summary


def _percent(key: str, interval: dict[str, float]) -> dict[str, float]:
    return interval if key == "edit_similarity" else {name: 100 * value for name, value in interval.items()}


def tokenizer_comparison(tokenizer: Tokenizer, files: list, task: dict) -> dict[str, float]:
    """Characters per token on the held-out files: this code tokenizer, and the one in `compare_tokenizer`."""
    text = "".join(file.text for file in files)
    result = {"code tokenizer": len(text) / max(1, len(tokenizer.encode(text)))}
    other = task.get("compare_tokenizer")
    if other and RunFolder(other).has_tokenizer():
        result[f"{other} tokenizer"] = len(text) / max(1, len(Tokenizer.load(other).encode(text)))
    return result


def _notes(metrics: dict, training_minutes: float | None) -> list[str]:
    intervals = metrics["intervals"]
    notes = [
        "Next line: the CodeXGLUE line-completion protocol on held-out files: the file up to the line's start is "
        "the prompt (not its indentation: the tokenizer joins a word to the space before it); exact match and edit "
        "similarity compare stripped lines. FIM: the same line hidden between its prefix and suffix. Parses: the "
        "whole file with the stripped completion in place, at the line's indentation, is valid Python (files that "
        "parsed before).",
        "95% bootstrap intervals: exact match {low:.1f}–{high:.1f}, ".format(**intervals["exact_match"])
        + "edit similarity {low:.1f}–{high:.1f}.".format(**intervals["edit_similarity"]),
        "Characters per token on the held-out code: "
        + ", ".join(f"{name} {value:.2f}" for name, value in metrics["tokenizer"].items())
        + ".",
        "Files: "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(metrics["files"].items()))
        + " (empty and binary files are skipped; invalid Python is kept for training).",
    ]
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(f"Training took {training_minutes:.1f} minutes. Training curve: ![loss]({RunFolder.LOSS_PLOT})")
    return notes


def evaluate_humaneval(model_dir, data: TaskData, out_dir, allow_code_execution: bool, samples: int,
                       temperature: float, max_new_tokens: int) -> dict:  # fmt: skip
    """pass@k of `samples` completions per HumanEval problem, each run in the sandbox."""
    if not allow_code_execution:
        raise UserError("pass@k runs the code the model writes: add --allow-code-execution (see the README's "
                        "code section for what the sandbox does and does not protect against)")  # fmt: skip
    if samples < 1 or (samples > 1 and temperature <= 0):
        raise UserError("--samples must be at least 1, and more than one sample needs --temperature above 0")
    model_dir, out_dir = report_folders(model_dir, out_dir)
    problems = completion.read_problems(data.source)[: data.max_eval_examples or None]
    lm = load(model_dir)
    completions, cut = completion.sample_completions(lm, problems, samples, temperature, max_new_tokens)
    outcomes = completion.check_completions(problems, completions, Limits())
    statuses = {s: sum(o.status == s for problem in outcomes for o in problem) for s in ("passed", "failed", "timeout")}
    metrics = {**completion.pass_at_ks(outcomes), "problems": len(problems), "samples": samples,
               "temperature": temperature, "prompts_cut_to_fit": cut, "statuses": statuses}  # fmt: skip
    columns = [(key, key) for key in metrics if key.startswith("pass@")]
    gallery = [{"task": p["task_id"], "completion": c[0].strip()[:80], "outcome": o[0].status}
               for p, c, o in list(zip(problems, completions, outcomes))[:10]]  # fmt: skip
    notes = ["pass@k: the unbiased estimator of Chen et al. 2021 over the samples of each problem; every sample ran "
             "in its own subprocess with time, memory and file-size limits (README: code completion)."]  # fmt: skip
    write_task_report(out_dir, f"HumanEval — {model_dir}", metrics, [("lmforge model", metrics)], columns, gallery,
                      f"{data.source}: {len(problems)} problems", notes)  # fmt: skip
    return metrics


TASK = Task(
    name="code",
    Recipe=Recipe,
    fields=FIELDS,
    family="decoder",
    objective=chat_sft_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
