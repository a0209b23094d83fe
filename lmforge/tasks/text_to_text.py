"""What translation and summarization share: text pairs in, an encoder-decoder trained on them, text out.

A task names which record field is the source and which the target; this
module trains one byte-level BPE tokenizer on both sides (or takes a `base`
run's tokenizer and weights: an encoder-decoder pretrained by `lmforge finetune
--task span`, or one already fine-tuned for a task), encodes sources as
`<bos> source <eos>` and targets as decoder input `[bos] + target` with labels
`target + [eos]` (`lmforge.models.seq2seq`'s convention), trains with the one
trainer, decodes with greedy or beam search, and writes the run folder and the
report. It does not know metrics or baselines: each task passes its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge.config import option
from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import evaluating, pick_device
from lmforge.errors import UserError
from lmforge.evaluate.metrics import means, paired_difference
from lmforge.generate.mbr import Utility, minimum_bayes_risk
from lmforge.generate.seq2seq_search import beam_search, greedy_search, sample_search
from lmforge.models import load_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Training
from lmforge.tasks.encoding import encode_single, model_folder, pad_right
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import seq2seq_loss
from lmforge.train.trainer import TrainConfig

Score = Callable[[list[str], list[str]], dict[str, float]]  # (hypotheses, references) -> metrics
# (hypotheses, references) -> each metric's value for every example; its means are the metrics
PerExampleScore = Callable[[list[str], list[str]], dict[str, list[float]]]


@dataclass
class TextToTextRecipe:
    """The recipe keys every text-to-text task has; a task's `Recipe` adds its own and changes defaults."""

    data: TaskData = option(TaskData(source=""), "a folder with train/valid/test.jsonl of text pairs")
    base: str | None = option(
        None, "encoder-decoder run to start from, e.g. one of --task span (its tokenizer and shape; none = scratch)"
    )
    vocab_size: int = option(8192, "tokenizer size; one tokenizer is trained on sources and targets together")
    model: Seq2SeqConfig = option(
        Seq2SeqConfig(hidden_size=256, num_encoder_layers=3, num_decoder_layers=3, num_heads=4, intermediate_size=1024),
        "encoder-decoder shape (a base run's own shape replaces it)",
    )
    max_source_length: int = option(64, "source tokens, <bos> and <eos> included; longer sources are cut")
    max_target_length: int = option(64, "target tokens plus one (<bos> or <eos>); also the generation limit")
    num_beams: int = option(4, "beams for the test-split decoding (1 = greedy only)")
    length_penalty: float = option(1.0, "beam hypotheses score log-prob / length**length_penalty")
    no_repeat_ngram_size: int = option(0, "when decoding, never repeat an n-gram of this many tokens (0 = off)")
    mbr_samples: int = option(
        0, "also decode the test split by minimum Bayes risk over this many samples per source (0 = off)"
    )
    mbr_temperature: float = option(0.7, "sampling temperature of the MBR candidates")
    valid_examples: int = option(100, "first validation examples decoded greedily for the metric during training")
    label_smoothing: float = option(
        0.0, "training loss: this share of each target's probability spread over the vocabulary (0 = plain)"
    )
    train: TrainConfig = option(
        TrainConfig(max_steps=2000, batch_size=32, lr=5e-4, warmup_steps=200, eval_every=500, save_every=500),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if self.max_source_length < 3:
            raise ValueError(f"max_source_length must be >= 3 (<bos>, a token, <eos>), not {self.max_source_length}")
        if self.max_target_length < 2:
            raise ValueError(f"max_target_length must be >= 2, not {self.max_target_length}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, not {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, not {self.no_repeat_ngram_size}")
        if self.mbr_samples < 0:
            raise ValueError(f"mbr_samples must be >= 0, not {self.mbr_samples}")
        if self.mbr_temperature <= 0:
            raise ValueError(f"mbr_temperature must be > 0, not {self.mbr_temperature}")
        if self.valid_examples < 0:
            raise ValueError(f"valid_examples must be >= 0, not {self.valid_examples}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")


def text_pairs(data: TaskData, split: str, source_field: str, target_field: str) -> tuple[list[str], list[str]]:
    """(sources, targets) of one split; a record missing either field, or with it empty, is a UserError."""
    records = task_records(data, split, (source_field, target_field))
    for record in records:
        for name in (source_field, target_field):
            # task_records catches missing and "" fields; a number or blank text would only fail later, obscurely.
            if not isinstance(record[name], str) or not record[name].strip():
                raise UserError(
                    f"field '{name}' must be non-blank text in the {split} split of {data.source}: {record}"
                )
    return [r[source_field] for r in records], [r[target_field] for r in records]


def encode_targets(tokenizer: Tokenizer, texts: list[str], max_target_length: int) -> list[list[int]]:
    """Target ids without markers, cut so [bos] + target and target + [eos] fit `max_target_length`."""
    return [ids[: max_target_length - 1] for ids in tokenizer.encode_batch(texts)]


def collate(tokenizer: Tokenizer, examples: list[tuple[list[int], list[int]]], rng=None) -> dict[str, torch.Tensor]:
    """(source row, target ids) pairs -> right-padded encoder and decoder tensors; labels IGNORE_INDEX on padding."""
    input_ids, attention_mask = pad_right(tokenizer, [source for source, _ in examples])  # (B, S)
    targets = [target for _, target in examples]
    decoder_input_ids, decoder_attention_mask = pad_right(tokenizer, [[tokenizer.bos_id, *t] for t in targets])
    labels, _ = pad_right(tokenizer, [[*t, tokenizer.eos_id] for t in targets])  # (B, T)
    labels[decoder_attention_mask == 0] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "labels": labels,
    }


def mean_loss(model: Seq2Seq, batches: list[dict[str, torch.Tensor]]) -> float:
    """Cross-entropy per target token over fixed batches (each batch weighted by its tokens)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            loss, tokens = seq2seq_loss(model, {key: value.to(device) for key, value in batch.items()})
            total += loss.item() * tokens
            count += tokens
    return total / max(count, 1)


def _decode_by_length(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    sources: list[str],
    max_source_length: int | None,
    batch_size: int,
    description: str,
    progress: bool,
    decode_batch: Callable[[torch.Tensor, torch.Tensor], list[str]],
) -> list[str]:
    """The sources' texts from `decode_batch` (right-padded input ids and mask -> texts), in the sources' order.

    Decoding runs in eval mode, in batches of sources of similar length; the model's mode is restored after.
    """
    device = next(model.parameters()).device
    rows = encode_single(tokenizer, sources, max_source_length or model.config.max_position_embeddings)
    # Sorting by length keeps padding, and so wasted work, small.
    order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
    outputs = [""] * len(rows)
    bar = tqdm(total=len(rows), desc=description, unit="text", disable=not progress, leave=False)
    with bar, evaluating(model):
        for chunk in in_batches(order, batch_size):
            input_ids, attention_mask = pad_right(tokenizer, [rows[index] for index in chunk])
            for index, text in zip(chunk, decode_batch(input_ids.to(device), attention_mask.to(device))):
                outputs[index] = text
            bar.update(len(chunk))
    return outputs


def generate_texts(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    sources: list[str],
    num_beams: int = 1,
    length_penalty: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_source_length: int | None = None,
    progress: bool = False,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """One output text per source, greedy when num_beams == 1 and beam search otherwise; in the sources' order.

    batch_size counts sources, so a beam-search batch holds batch_size * num_beams rows.
    """

    def decode_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        if num_beams == 1:
            ids = greedy_search(
                model, input_ids, attention_mask, tokenizer.bos_id, tokenizer.eos_id, max_new_tokens,
                no_repeat_ngram_size=no_repeat_ngram_size,
            )  # fmt: skip
        else:
            ids = beam_search(
                model,
                input_ids,
                attention_mask,
                tokenizer.bos_id,
                tokenizer.eos_id,
                max_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
            )
        return [tokenizer.decode(tokens).strip() for tokens in ids]

    description = "greedy" if num_beams == 1 else f"beam search ({num_beams})"
    return _decode_by_length(
        model, tokenizer, sources, max_source_length, batch_size, description, progress, decode_batch
    )


def mbr_texts(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    sources: list[str],
    num_samples: int,
    utility: Utility,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_source_length: int | None = None,
    progress: bool = False,
    no_repeat_ngram_size: int = 0,
    seed: int = 0,
) -> list[str]:
    """One output text per source: of `num_samples` sampled outputs, the minimum-Bayes-risk choice under `utility`.

    Seeded, so a split decodes the same way every time. batch_size counts sources (batch_size * num_samples rows).
    """
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)

    def decode_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        samples = sample_search(
            model,
            input_ids,
            attention_mask,
            tokenizer.bos_id,
            tokenizer.eos_id,
            max_new_tokens,
            num_samples,
            temperature=temperature,
            no_repeat_ngram_size=no_repeat_ngram_size,
            generator=generator,
        )
        return [minimum_bayes_risk([tokenizer.decode(ids).strip() for ids in texts], utility) for texts in samples]

    description = f"MBR ({num_samples} samples)"
    return _decode_by_length(
        model, tokenizer, sources, max_source_length, batch_size, description, progress, decode_batch
    )


def task_decoding(recipe: TextToTextRecipe) -> dict[str, Any]:
    """The decoding settings task.json records, the defaults of the run's evaluations."""
    return {
        "max_source_length": recipe.max_source_length,
        "max_target_length": recipe.max_target_length,
        "num_beams": recipe.num_beams,
        "length_penalty": recipe.length_penalty,
        "no_repeat_ngram_size": recipe.no_repeat_ngram_size,
        "mbr_samples": recipe.mbr_samples,
        "mbr_temperature": recipe.mbr_temperature,
    }


def base_seq2seq(recipe: TextToTextRecipe, task_name: str) -> tuple[Seq2Seq, Tokenizer]:
    """The encoder-decoder and tokenizer of the run `recipe.base`, in training mode.

    The recipe's vocab_size and model shape become the base's; dropout stays the recipe's (a fine-tuning choice),
    and `model.copy: true` adds a new pointer head (seeded by train.seed) to a base without one, as an encoder task
    adds its own head; source and target lengths are cut to the base's learned positions.
    """
    folder = model_folder(recipe.base)
    stored = RunFolder(folder).read_config()
    imported = "model_type" in stored or "architectures" in stored
    family = stored.get("family", "decoder")  # as read_model_config reads a folder from before families
    if imported or family != "seq2seq":
        what = "a Hugging Face model folder" if imported else f"an lmforge {family} run"
        raise UserError(
            f"--base {recipe.base} is {what}; {task_name} starts from an encoder-decoder (seq2seq) run, "
            "e.g. one made by `lmforge finetune --task span`"
        )
    if stored.get("quantization"):
        raise UserError(f"--base {recipe.base} is quantized; fine-tune from the full-precision run it was made from")
    model = load_model(folder)
    tokenizer = Tokenizer.load(folder)
    notes = []
    adding_copy = recipe.model.copy and not model.config.copy
    if adding_copy or recipe.model.dropout != model.config.dropout:
        torch.manual_seed(recipe.train.seed)  # a new pointer head starts from seeded weights
        config = dataclasses.replace(model.config, copy=model.config.copy or recipe.model.copy,
                                     dropout=recipe.model.dropout)  # fmt: skip
        rebuilt = Seq2Seq(config)
        missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(name.startswith("copy_") for name in missing), (missing, unexpected)
        model = rebuilt
        notes.append(f"dropout {config.dropout} (the recipe's)")
        if adding_copy:
            notes.append("a new pointer head (model.copy)")
    if model.config.position == "learned":
        longest = model.config.max_position_embeddings
        if max(recipe.max_source_length, recipe.max_target_length) > longest:
            notes.append(f"sources and targets cut to its {longest} positions")
        recipe.max_source_length = min(recipe.max_source_length, longest)
        recipe.max_target_length = min(recipe.max_target_length, longest)
    config = recipe.model = model.config
    recipe.vocab_size = tokenizer.vocab_size
    shape = f"hidden {config.hidden_size}, {config.num_encoder_layers}+{config.num_decoder_layers} layers"
    print(f"starting from --base {recipe.base}: its tokenizer ({tokenizer.vocab_size:,} tokens) and model shape "
          f"({shape}) replace the recipe's vocab_size and model shape; no tokenizer is trained"
          + "".join(f"; {note}" for note in notes))  # fmt: skip
    return model.train(), tokenizer


def prepare_text_to_text(
    recipe: TextToTextRecipe,
    setup: Setup,
    task: dict,
    score: Score,
    warm_up_pairs: Callable[[list[str]], tuple[list[str], list[str]]] | None = None,
    warm_up_steps: int = 0,
) -> Training:
    """A tokenizer and an encoder-decoder for a task's pairs, its training batches and its validation.

    task: what task.json records about the task, at least {"task", "source_field", "target_field"}.
    score: the task's metric on decoded validation text, watched during training.
    warm_up_pairs, warm_up_steps: an optional first phase of that many steps on self-supervised pairs made from the
    training sources (e.g. summarization's lead-bias pretraining), in `out_dir/warm-up` before the task's pairs.
    """
    sources, targets = text_pairs(recipe.data, "train", task["source_field"], task["target_field"])
    valid_sources, valid_targets = text_pairs(recipe.data, "valid", task["source_field"], task["target_field"])
    if recipe.base:
        model, tokenizer = base_seq2seq(recipe, task["task"])
        task = {**task, "base": recipe.base}
    else:
        # One vocabulary for both sides: the embedding is shared by encoder, decoder and output layer.
        tokenizer = setup.tokenizer(lambda: sources + targets, recipe.vocab_size)
        recipe.model.vocab_size = tokenizer.vocab_size
        recipe.model.max_position_embeddings = max(
            recipe.model.max_position_embeddings, recipe.max_source_length, recipe.max_target_length
        )
        torch.manual_seed(recipe.train.seed)
        model = Seq2Seq(recipe.model)
    model.to(setup.device)
    print(f"encoder-decoder ({task['task']}): {model.num_parameters():,} parameters on {setup.device}; "
          f"{len(sources):,} pairs")  # fmt: skip

    def examples(texts: list[str], references: list[str]) -> list[tuple[list[int], list[int]]]:
        source_rows = encode_single(tokenizer, texts, recipe.max_source_length)
        return list(zip(source_rows, encode_targets(tokenizer, references, recipe.max_target_length)))

    batch_collate = functools.partial(collate, tokenizer)
    objective = {"label_smoothing": recipe.label_smoothing}  # validation loss stays plain cross-entropy
    first_phase = None
    if warm_up_pairs is not None and warm_up_steps:

        def first_phase() -> None:
            warm_sources, warm_targets = warm_up_pairs(sources)
            print(f"warm-up phase: {warm_up_steps} steps on {len(warm_sources):,} self-supervised pairs")
            warm_batches = ExampleBatches(examples(warm_sources, warm_targets), recipe.train.batch_size, batch_collate)
            loss = functools.partial(seq2seq_loss, **objective)
            setup.first_phase(model, loss, warm_batches.batch, recipe.train, warm_up_steps)

    batches = ExampleBatches(examples(sources, targets), recipe.train.batch_size, batch_collate, seed=recipe.train.seed)
    valid_batches = [
        batch_collate(chunk) for chunk in in_batches(examples(valid_sources, valid_targets), recipe.train.batch_size)
    ]
    decoded = (valid_sources[: recipe.valid_examples], valid_targets[: recipe.valid_examples])

    def validate(model: Seq2Seq) -> dict[str, float]:
        results = {"loss": mean_loss(model, valid_batches)}
        if decoded[0]:
            # Greedy on a small slice keeps the check cheap; the test split gets the full treatment.
            outputs = generate_texts(
                model, tokenizer, decoded[0], max_new_tokens=recipe.max_target_length, batch_size=64,
                max_source_length=recipe.max_source_length, no_repeat_ngram_size=recipe.no_repeat_ngram_size,
            )  # fmt: skip
            results.update(_numbers(score(outputs, decoded[1])))
        return results

    return Training(
        model, tokenizer, batches.batch, validate, task_info={**task, **task_decoding(recipe)},
        max_length=recipe.max_source_length, title=f"{task['task']} training", objective_options=objective,
        warm_up=first_phase,
    )  # fmt: skip


@dataclass
class Scoring:
    """What a text-to-text task brings to its evaluation: metrics, baselines and the report's words.

    baselines: name -> function from the split's sources to its outputs. utility: the sentence metric MBR
    decoding maximises (none: no MBR). per_example: the metric per example, for paired differences from baselines.
    paired: for a corpus metric without per-example values, (ours, theirs, references) -> metric -> a paired
    bootstrap test of ours against a baseline (`evaluate.metrics.paired_bleu_chrf`'s shape).
    """

    score: Score
    columns: list[tuple[str, str]]
    baselines: dict[str, Callable[[list[str]], list[str]]]
    notes: list[str]
    utility: Utility | None = None
    per_example: PerExampleScore | None = None
    paired: Callable[[list[str], list[str], list[str]], dict[str, dict[str, float]]] | None = None


@dataclass
class Decoding:
    """How a split is decoded: the run's task.json settings, each replaceable by the caller."""

    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    max_new_tokens: int
    max_source_length: int
    mbr_samples: int
    mbr_temperature: float

    @classmethod
    def of_run(cls, task: dict, **overrides: Any) -> Decoding:
        settings = {
            "num_beams": task["num_beams"],
            "length_penalty": task["length_penalty"],
            "no_repeat_ngram_size": task.get("no_repeat_ngram_size", 0),
            "max_new_tokens": task["max_target_length"],
            "max_source_length": task["max_source_length"],
            "mbr_samples": task.get("mbr_samples", 0),
            "mbr_temperature": task.get("mbr_temperature", 0.7),
        }
        decoding = cls(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})
        if decoding.num_beams < 1:
            raise UserError(f"num_beams must be >= 1, not {decoding.num_beams}")
        if decoding.mbr_samples < 0:
            raise UserError(f"mbr_samples must be >= 0, not {decoding.mbr_samples}")
        return decoding

    def names(self) -> dict[str, str]:
        """Report names of the decodings."""
        return {
            "greedy": "lmforge seq2seq, greedy",
            "beam": f"lmforge seq2seq, beam search ({self.num_beams})",
            "mbr": f"lmforge seq2seq, MBR over {self.mbr_samples} samples (temperature {self.mbr_temperature})",
        }

    def report(self) -> dict[str, Any]:
        """metrics.json's decoding entry."""
        return {
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "max_new_tokens": self.max_new_tokens,
            "mbr_samples": self.mbr_samples,
            "mbr_temperature": self.mbr_temperature,
        }


def decode_split(
    model: Seq2Seq, tokenizer: Tokenizer, sources: list[str], decoding: Decoding, utility: Utility | None, progress
) -> dict[str, list[str]]:
    """Outputs by decoding: greedy, beam search when num_beams > 1, MBR when mbr_samples > 0 (most thorough last)."""
    common = dict(
        max_new_tokens=decoding.max_new_tokens, max_source_length=decoding.max_source_length, progress=progress,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
    )  # fmt: skip
    outputs = {"greedy": generate_texts(model, tokenizer, sources, num_beams=1, length_penalty=decoding.length_penalty,
                                        **common)}  # fmt: skip
    if decoding.num_beams > 1:
        outputs["beam"] = generate_texts(
            model, tokenizer, sources, num_beams=decoding.num_beams, length_penalty=decoding.length_penalty, **common
        )
    if decoding.mbr_samples:
        outputs["mbr"] = mbr_texts(
            model, tokenizer, sources, decoding.mbr_samples, utility, temperature=decoding.mbr_temperature, **common
        )
    return outputs


def score_outputs(
    outputs: dict[str, list[str]], baseline_outputs: dict[str, list[str]], references: list[str], scoring: Scoring
) -> tuple[dict, dict, dict]:
    """(scores by decoding, scores by baseline, paired differences of the last decoding from each baseline)."""
    if scoring.per_example is None:
        scores = {kind: scoring.score(texts, references) for kind, texts in outputs.items()}
        baseline_scores = {name: scoring.score(texts, references) for name, texts in baseline_outputs.items()}
        if scoring.paired is None:
            return scores, baseline_scores, {}
        final = outputs[list(outputs)[-1]]
        tests = {name: scoring.paired(final, theirs, references) for name, theirs in baseline_outputs.items()}
        return scores, baseline_scores, tests
    values = {kind: scoring.per_example(texts, references) for kind, texts in outputs.items()}
    baseline_values = {name: scoring.per_example(texts, references) for name, texts in baseline_outputs.items()}
    final = values[list(outputs)[-1]]
    differences = {
        name: {key: paired_difference(final[key], theirs[key]) for key in theirs}
        for name, theirs in baseline_values.items()
    }
    scores = {kind: means(per_metric) for kind, per_metric in values.items()}
    return scores, {name: means(per_metric) for name, per_metric in baseline_values.items()}, differences


def evaluate_text_to_text(
    task_name: str,
    model_dir: str | Path,
    data: TaskData,
    split: str,
    out_dir: str | Path | None,
    scoring: Scoring,
    training_minutes: float | None = None,
    progress: bool = True,
    compare: str | Path | None = None,
    **overrides: Any,
) -> dict:
    """Decode a split greedily, with beam search and by MBR, score each beside the baselines, write the report.

    compare: another run of the task, decoded as its task.json says, becomes one more baseline.

    overrides: num_beams, length_penalty, no_repeat_ngram_size or mbr_samples instead of the run's task.json;
    MBR decoding (`mbr_samples` > 0) needs the task's utility. The top-level scores in metrics.json are those
    of the last decoding: MBR's, else the beam search's (greedy's when num_beams is 1). With a per-example
    metric, each baseline also gets that decoding's paired difference from it with a 95% bootstrap interval:
    metrics.json baselines.NAME.difference.
    """
    model_dir, out_dir = report_folders(model_dir, out_dir)
    task = RunFolder(model_dir).read_task()
    if task.get("task") != task_name:
        raise UserError(f"{model_dir} was fine-tuned for task '{task.get('task')}', not '{task_name}'")
    decoding = Decoding.of_run(task, **overrides)
    if decoding.mbr_samples and scoring.utility is None:
        raise UserError(f"task '{task_name}' has no utility for minimum Bayes risk decoding; use mbr_samples 0")
    model = load_model(model_dir, pick_device("auto"))
    tokenizer = Tokenizer.load(model_dir)
    sources, references = text_pairs(data, split, task["source_field"], task["target_field"])
    outputs = decode_split(model, tokenizer, sources, decoding, scoring.utility, progress)
    final = list(outputs)[-1]  # the most thorough decoding asked for is the one reported
    baselines = dict(scoring.baselines)
    if compare is not None:
        baselines[f"run {compare}"] = run_baseline(compare, task_name, task, scoring.utility, progress)
    baseline_outputs = {name: baseline(sources) for name, baseline in baselines.items()}
    scores, baseline_scores, differences = score_outputs(outputs, baseline_outputs, references, scoring)
    names = decoding.names()
    rows = [(names[kind], values) for kind, values in scores.items()]
    rows += [(f"baseline: {name}", values) for name, values in baseline_scores.items()]
    metrics = {
        "task": task["task"], "split": split, "examples": len(sources), **scores[final], "decoding": decoding.report(),
        **scores,
        "baselines": {
            name: {**_numbers(values), **({"difference": differences[name]} if name in differences else {})}
            for name, values in baseline_scores.items()
        },
        "training_minutes": training_minutes,
    }  # fmt: skip
    if "direction" in task:
        metrics["direction"] = task["direction"]
    notes = _notes(scoring, training_minutes, differences, names[final])
    if "base" in task:
        metrics["base"] = task["base"]
        notes.insert(
            0,
            f"Fine-tuned from the encoder-decoder run `{task['base']}` (`--base`): its weights, its tokenizer and its "
            "model shape, which replaced the recipe's vocab_size and model.",
        )
    examples = [
        {"source": source[:80], "reference": reference, "output": output}
        for source, reference, output in list(zip(sources, references, outputs[final]))[:8]
    ]
    title = f"{task['task']}{' ' + task['direction'] if 'direction' in task else ''} — {model_dir}"
    write_task_report(out_dir, title, metrics, rows, scoring.columns, examples,
                      describe_split(data, split, task["source_field"]), notes)  # fmt: skip
    return metrics


def _notes(scoring: Scoring, training_minutes: float | None, differences: dict, final_name: str) -> list[str]:
    notes = list(scoring.notes)
    if training_minutes is not None:
        notes.insert(
            0, f"Fine-tuning took {training_minutes:.1f} minutes. Training curve: ![loss]({RunFolder.LOSS_PLOT})"
        )
    if scoring.paired is not None:  # corpus metrics: sacrebleu's test of the two systems
        describe, joiner = _bootstrap_test, "; "
        sentence = ("{final} against baseline '{name}', sacrebleu's paired bootstrap (1,000 resamples, 95% intervals): "
                    "{spans}. A p-value above 0.05 is no evidence of a difference.")  # fmt: skip
    else:  # per-example metrics: the interval of the mean difference
        describe, joiner = _mean_difference, ", "
        sentence = ("{final} minus baseline '{name}', per example, with a 95% paired bootstrap interval: {spans}. "
                    "An interval that contains 0 is no evidence of a difference.")  # fmt: skip
    for name, by_metric in differences.items():
        spans = [f"{heading} {describe(found)}" for key, heading in scoring.columns if (found := by_metric.get(key))]
        notes.append(sentence.format(final=final_name, name=name, spans=joiner.join(spans)))
    return notes


def _bootstrap_test(t: dict[str, float]) -> str:
    ours, theirs = f"{t['ours']:.2f} ± {t['ours_ci']:.2f}", f"{t['theirs']:.2f} ± {t['theirs_ci']:.2f}"
    return f"{ours} against {theirs}, p = {t['p_value']:.3g}"


def _mean_difference(d: dict[str, float]) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def run_baseline(run: str | Path, task_name: str, task: dict, utility: Utility | None, progress: bool):
    """Another run of the same task as a baseline: sources -> its outputs, decoded as its task.json says."""
    folder = model_folder(str(run))  # it reads builtin: names from strings; the CLI passes a Path
    theirs = RunFolder(folder).read_task(default={})
    if theirs.get("task") != task_name or theirs.get("direction") != task.get("direction"):
        what = " ".join(str(theirs.get(key, "")) for key in ("task", "direction")).strip() or "no task"
        raise UserError(f"--compare {run} is a run of {what!r}, not of {task_name} {task.get('direction', '')}")

    def decode(sources: list[str]) -> list[str]:
        model, tokenizer = load_model(folder, pick_device("auto")), Tokenizer.load(folder)
        outputs = decode_split(model, tokenizer, sources, Decoding.of_run(theirs), utility, progress)
        return outputs[list(outputs)[-1]]

    return decode


def _numbers(values: dict) -> dict[str, float]:
    # Validation metrics and baseline rows are logged and printed as numbers; sacrebleu's signature strings
    # are kept once, with the model's test scores.
    return {key: value for key, value in values.items() if isinstance(value, (int, float))}
