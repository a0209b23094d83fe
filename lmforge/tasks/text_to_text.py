"""What translation and summarization share: text pairs in, an encoder-decoder trained on them, text out.

A task names which record field is the source and which the target; this
module trains one byte-level BPE tokenizer on both sides, encodes sources as
`<bos> source <eos>` and targets as decoder input `[bos] + target` with labels
`target + [eos]` (`lmforge.models.seq2seq`'s convention), trains with the one
trainer, decodes with greedy or beam search, and writes the run folder and the
report. It does not know metrics or baselines: each task passes its own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import option, to_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.evaluate.metrics import means, paired_difference
from lmforge.evaluate.report import plot_losses
from lmforge.generate.mbr import Utility, minimum_bayes_risk
from lmforge.generate.seq2seq_search import beam_search, greedy_search, sample_search
from lmforge.models import load_model, save_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import read_json, read_jsonl, write_json
from lmforge.tasks.encoding import encode_single, pad_right
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.trainer import TrainConfig, train

IGNORE = -100  # F.cross_entropy's ignore_index
Score = Callable[[list[str], list[str]], dict[str, float]]  # (hypotheses, references) -> metrics
# (hypotheses, references) -> each metric's value for every example; its means are the metrics
PerExampleScore = Callable[[list[str], list[str]], dict[str, list[float]]]


@dataclass
class TextToTextRecipe:
    """The recipe keys every text-to-text task has; a task's `Recipe` adds its own and changes defaults."""

    data: TaskData = option(TaskData(source=""), "a folder with train/valid/test.jsonl of text pairs")
    vocab_size: int = option(8192, "tokenizer size; one tokenizer is trained on sources and targets together")
    model: Seq2SeqConfig = option(
        Seq2SeqConfig(hidden_size=256, num_encoder_layers=3, num_decoder_layers=3, num_heads=4, intermediate_size=1024),
        "encoder-decoder shape",
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


def train_tokenizer(sources: list[str], targets: list[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    # One vocabulary for both sides: the embedding is shared by encoder, decoder and output layer.
    return Tokenizer.train(sources + targets, vocab_size, show_progress=progress)


def encode_targets(tokenizer: Tokenizer, texts: list[str], max_target_length: int) -> list[list[int]]:
    """Target ids without markers, cut so [bos] + target and target + [eos] fit `max_target_length`."""
    return [ids[: max_target_length - 1] for ids in tokenizer.encode_batch(texts)]


def collate(tokenizer: Tokenizer, examples: list[tuple[list[int], list[int]]], rng=None) -> dict[str, torch.Tensor]:
    """(source row, target ids) pairs -> right-padded encoder and decoder tensors; labels are IGNORE on padding."""
    input_ids, attention_mask = pad_right(tokenizer, [source for source, _ in examples])  # (B, S)
    targets = [target for _, target in examples]
    decoder_input_ids, decoder_attention_mask = pad_right(tokenizer, [[tokenizer.bos_id, *t] for t in targets])
    labels, _ = pad_right(tokenizer, [[*t, tokenizer.eos_id] for t in targets])  # (B, T)
    labels[decoder_attention_mask == 0] = IGNORE
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "labels": labels,
    }


def seq2seq_loss(
    model: Seq2Seq, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Token-level cross-entropy over the target tokens and eos (optionally against smoothed labels)."""
    # NOTE: no decoder_attention_mask: right padding follows every real token, so the causal mask already hides
    # it from them, and without a padding mask attention keeps SDPA's causal fast path.
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, vocab)
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing
    )
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def mean_loss(model: Seq2Seq, batches: list[dict[str, torch.Tensor]]) -> float:
    """Cross-entropy per target token over fixed batches (each batch weighted by its tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        loss, tokens = seq2seq_loss(model, {key: value.to(device) for key, value in batch.items()})
        total += loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = encode_single(tokenizer, sources, max_source_length or model.config.max_position_embeddings)
    # Sorting by length keeps padding, and so wasted work, small.
    order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
    outputs = [""] * len(rows)
    with tqdm(total=len(rows), desc=description, unit="text", disable=not progress, leave=False) as bar:
        for chunk in in_batches(order, batch_size):
            input_ids, attention_mask = pad_right(tokenizer, [rows[index] for index in chunk])
            for index, text in zip(chunk, decode_batch(input_ids.to(device), attention_mask.to(device))):
                outputs[index] = text
            bar.update(len(chunk))
    model.train(was_training)
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


def finetune_text_to_text(
    recipe: TextToTextRecipe,
    out_dir: str | Path,
    task: dict,
    score: Score,
    evaluate_run: Callable[..., dict],
    resume: bool = False,
    progress: bool = True,
    warm_up_pairs: Callable[[list[str]], tuple[list[str], list[str]]] | None = None,
    warm_up: TrainConfig | None = None,
) -> dict:
    """Train a tokenizer and an encoder-decoder on a task's pairs, save the run folder, then score the test split.

    task: what task.json records about the task, at least {"task", "source_field", "target_field"}.
    score: the task's metric on decoded validation text, watched during training.
    warm_up_pairs, warm_up: an optional first phase on self-supervised pairs made from the training sources
    (e.g. summarization's lead-bias pretraining), trained with `warm_up` in `out_dir/warm-up` before the task's pairs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(recipe.device)
    source_field, target_field = task["source_field"], task["target_field"]
    sources, targets = text_pairs(recipe.data, "train", source_field, target_field)
    valid_sources, valid_targets = text_pairs(recipe.data, "valid", source_field, target_field)

    tokenizer = train_tokenizer(sources, targets, recipe.vocab_size, progress)
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.max_position_embeddings = max(
        recipe.model.max_position_embeddings, recipe.max_source_length, recipe.max_target_length
    )
    torch.manual_seed(recipe.train.seed)
    model = Seq2Seq(recipe.model).to(device)
    print(
        f"encoder-decoder ({task['task']}): {model.num_parameters():,} parameters on {device}; {len(sources):,} pairs"
    )

    def examples(texts: list[str], references: list[str]) -> list[tuple[list[int], list[int]]]:
        source_rows = encode_single(tokenizer, texts, recipe.max_source_length)
        return list(zip(source_rows, encode_targets(tokenizer, references, recipe.max_target_length)))

    batch_collate = functools.partial(collate, tokenizer)
    # Validation loss stays plain cross-entropy, comparable across recipes.
    training_loss = functools.partial(seq2seq_loss, label_smoothing=recipe.label_smoothing)
    started = time.perf_counter()
    if warm_up_pairs is not None and warm_up is not None:
        warm_sources, warm_targets = warm_up_pairs(sources)
        print(f"warm-up phase: {warm_up.max_steps} steps on {len(warm_sources):,} self-supervised pairs")
        warm_batches = ExampleBatches(examples(warm_sources, warm_targets), warm_up.batch_size, batch_collate)
        train(model, training_loss, warm_batches.batch, warm_up, out_dir / "warm-up", resume=resume, progress=progress)
        model.train()
    batches = ExampleBatches(examples(sources, targets), recipe.train.batch_size, batch_collate, seed=recipe.train.seed)
    valid_batches = [
        batch_collate(chunk) for chunk in in_batches(examples(valid_sources, valid_targets), recipe.train.batch_size)
    ]
    decoded_sources = valid_sources[: recipe.valid_examples]
    decoded_references = valid_targets[: recipe.valid_examples]

    def evaluate(model: Seq2Seq) -> dict[str, float]:
        results = {"loss": mean_loss(model, valid_batches)}
        if decoded_sources:
            # Greedy on a small slice keeps the check cheap; the test split gets the full treatment.
            outputs = generate_texts(
                model,
                tokenizer,
                decoded_sources,
                max_new_tokens=recipe.max_target_length,
                batch_size=64,
                max_source_length=recipe.max_source_length,
                no_repeat_ngram_size=recipe.no_repeat_ngram_size,
            )
            results.update(_numbers(score(outputs, decoded_references)))
        return results

    train(model, training_loss, batches.batch, recipe.train, out_dir, evaluate, resume=resume, progress=progress)
    minutes = (time.perf_counter() - started) / 60
    save_model(out_dir, model)
    tokenizer.save(out_dir, model_max_length=recipe.max_source_length)
    decoding = {
        "max_source_length": recipe.max_source_length,
        "max_target_length": recipe.max_target_length,
        "num_beams": recipe.num_beams,
        "length_penalty": recipe.length_penalty,
        "no_repeat_ngram_size": recipe.no_repeat_ngram_size,
        "mbr_samples": recipe.mbr_samples,
        "mbr_temperature": recipe.mbr_temperature,
    }
    write_json(out_dir / "task.json", {**task, **decoding})
    write_json(out_dir / "recipe.json", to_dict(recipe))
    plot_losses(read_jsonl(out_dir / "metrics.jsonl"), out_dir / "loss.png", title=f"{task['task']} training")
    return evaluate_run(out_dir, recipe.data, "test", out_dir, training_minutes=minutes, progress=progress)


def evaluate_text_to_text(
    task_name: str,
    model_dir: str | Path,
    data: TaskData,
    split: str,
    out_dir: str | Path | None,
    score: Score,
    columns: list[tuple[str, str]],
    baselines: dict[str, Callable[[list[str]], list[str]]],
    notes: list[str],
    training_minutes: float | None = None,
    progress: bool = True,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    per_example: PerExampleScore | None = None,
    utility: Utility | None = None,
    mbr_samples: int | None = None,
) -> dict:
    """Decode a split greedily, with beam search and by MBR, score each beside the baselines, write the report.

    baselines: name -> function from the split's sources to its outputs. The decoding settings default to the
    run's task.json; MBR decoding (`mbr_samples` > 0) needs the task's `utility`. The top-level scores in
    metrics.json are those of the last decoding: MBR's, else the beam search's (greedy's when num_beams is 1).
    With `per_example` (a metric averaged over examples), each baseline also gets that decoding's paired
    difference from it with a 95% bootstrap interval: metrics.json baselines.NAME.difference.
    """
    model_dir, out_dir = report_folders(model_dir, out_dir)
    task = read_json(model_dir / "task.json")
    if task.get("task") != task_name:
        raise UserError(f"{model_dir} was fine-tuned for task '{task.get('task')}', not '{task_name}'")
    num_beams = task["num_beams"] if num_beams is None else num_beams
    length_penalty = task["length_penalty"] if length_penalty is None else length_penalty
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = task.get("no_repeat_ngram_size", 0)
    mbr_samples = task.get("mbr_samples", 0) if mbr_samples is None else mbr_samples
    mbr_temperature = task.get("mbr_temperature", 0.7)
    if num_beams < 1:
        raise UserError(f"num_beams must be >= 1, not {num_beams}")
    if mbr_samples < 0:
        raise UserError(f"mbr_samples must be >= 0, not {mbr_samples}")
    if mbr_samples and utility is None:
        raise UserError(f"task '{task_name}' has no utility for minimum Bayes risk decoding; use mbr_samples 0")
    model = load_model(model_dir, pick_device("auto"))
    tokenizer = Tokenizer.load(model_dir)
    sources, references = text_pairs(data, split, task["source_field"], task["target_field"])

    def decode(beams: int) -> list[str]:
        return generate_texts(
            model,
            tokenizer,
            sources,
            num_beams=beams,
            length_penalty=length_penalty,
            max_new_tokens=task["max_target_length"],
            max_source_length=task["max_source_length"],
            progress=progress,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )

    outputs = {"greedy": decode(1)}
    if num_beams > 1:
        outputs["beam"] = decode(num_beams)
    if mbr_samples:
        outputs["mbr"] = mbr_texts(
            model,
            tokenizer,
            sources,
            mbr_samples,
            utility,
            temperature=mbr_temperature,
            max_new_tokens=task["max_target_length"],
            max_source_length=task["max_source_length"],
            progress=progress,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
    final = list(outputs)[-1]  # the most thorough decoding asked for is the one reported
    baseline_outputs = {name: baseline(sources) for name, baseline in baselines.items()}
    differences: dict[str, dict[str, dict[str, float]]] = {}
    if per_example is None:
        scores = {kind: score(texts, references) for kind, texts in outputs.items()}
        baseline_scores = {name: score(texts, references) for name, texts in baseline_outputs.items()}
    else:
        values = {kind: per_example(texts, references) for kind, texts in outputs.items()}
        baseline_values = {name: per_example(texts, references) for name, texts in baseline_outputs.items()}
        scores = {kind: means(per_metric) for kind, per_metric in values.items()}
        baseline_scores = {name: means(per_metric) for name, per_metric in baseline_values.items()}
        for name, theirs in baseline_values.items():
            differences[name] = {key: paired_difference(values[final][key], theirs[key]) for key in theirs}

    names = {
        "greedy": "lmforge seq2seq, greedy",
        "beam": f"lmforge seq2seq, beam search ({num_beams})",
        "mbr": f"lmforge seq2seq, MBR over {mbr_samples} samples (temperature {mbr_temperature})",
    }
    rows = [(names[kind], values) for kind, values in scores.items()]
    rows += [(f"baseline: {name}", values) for name, values in baseline_scores.items()]
    metrics = {
        "task": task["task"],
        "split": split,
        "examples": len(sources),
        **scores[final],
        "decoding": {
            "num_beams": num_beams,
            "length_penalty": length_penalty,
            "no_repeat_ngram_size": no_repeat_ngram_size,
            "max_new_tokens": task["max_target_length"],
            "mbr_samples": mbr_samples,
            "mbr_temperature": mbr_temperature,
        },
        **scores,
        "baselines": {
            name: {**_numbers(values), **({"difference": differences[name]} if name in differences else {})}
            for name, values in baseline_scores.items()
        },
        "training_minutes": training_minutes,
    }
    if "direction" in task:
        metrics["direction"] = task["direction"]
    notes = list(notes)
    if training_minutes is not None:
        notes.insert(0, f"Fine-tuning took {training_minutes:.1f} minutes. Training curve: ![loss](loss.png)")
    for name, by_metric in differences.items():
        spans = [
            f"{heading} {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            for key, heading in columns
            if (d := by_metric.get(key))
        ]
        notes.append(
            f"{names[final]} minus baseline '{name}', per example, with a 95% paired bootstrap interval: "
            f"{', '.join(spans)}. An interval that contains 0 is no evidence of a difference."
        )
    examples = [
        {"source": source[:80], "reference": reference, "output": output}
        for source, reference, output in list(zip(sources, references, outputs[final]))[:8]
    ]
    title = f"{task['task']}{' ' + task['direction'] if 'direction' in task else ''} — {model_dir}"
    write_task_report(
        out_dir, title, metrics, rows, columns, examples, describe_split(data, split, task["source_field"]), notes
    )
    return metrics


def _numbers(values: dict) -> dict[str, float]:
    # Validation metrics and baseline rows are logged and printed as numbers; sacrebleu's signature strings
    # are kept once, with the model's test scores.
    return {key: value for key, value in values.items() if isinstance(value, (int, float))}
