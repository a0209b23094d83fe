"""Span-corruption pretraining of an encoder-decoder (T5's objective) on plain text.

Texts are packed into rows of `max_length` tokens (T5's packing: one
`<bos> text <eos>` stream cut into full rows, so no step pads). In each row
about 15% of the tokens are dropped, in spans of mean length 3; the encoder
reads the row with each span replaced by one sentinel (`<extra_id_0>`,
`<extra_id_1>`, ... of `data.tokenizer.SENTINEL_TOKENS`, 32 of them, appended
to the tokenizer), and the decoder writes every sentinel followed by the span
it stands for, then `<eos>` (Raffel et al., https://arxiv.org/abs/1910.10683
sec. 3.1.4). The loss is `seq2seq_loss`, the one translation and summarization
train with, so the run folder is a Seq2Seq model folder they start from with
`--base`.

Data as for `mlm`: any text source, or a `lmforge data prepare` folder read
lazily (its tokenizer, plus the sentinels; its shards hold the same stream).
`extra_texts` adds the training split of pair data sets (e.g.
`../shared/data/translation`, both `src` and `tgt`) as more rows, so the
tokenizer and the model see the English a later translation needs; a tokenizer
trained here is trained on every text the model sees (a prepared folder's is
its own: prepare it from text that has English too).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import option
from lmforge.data.tokenizer import SENTINEL_TOKENS, Tokenizer
from lmforge.data.tokens import ShardedTokens, encode_documents, is_prepared, token_dtype
from lmforge.errors import UserError
from lmforge.generate.seq2seq_search import greedy_search
from lmforge.models import load_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
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
from lmforge.tasks.mlm import StreamRows
from lmforge.tasks.text_to_text import collate, mean_loss
from lmforge.train.objectives import seq2seq_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("text",)
VALID_SEED = 12345  # the same corruption of the validation rows at every evaluation


@dataclass
class Recipe:
    data: TaskData = option(
        TaskData(source="builtin:peoples-daily", valid_fraction=0.01, test_fraction=0.01),
        "text, or a `lmforge data prepare` folder (its shards and tokenizer; vocab_size is then the tokenizer's)",
    )
    extra_texts: list[str] = option(
        [], "pair data sets whose train split adds rows of text, e.g. [../shared/data/translation]"
    )
    extra_fields: list[str] = option(["src", "tgt"], "the fields of every extra_texts record read as text")
    vocab_size: int = option(8192, f"tokenizer size, before the {len(SENTINEL_TOKENS)} sentinels added after it")
    model: Seq2SeqConfig = option(
        Seq2SeqConfig(hidden_size=256, num_encoder_layers=3, num_decoder_layers=3, num_heads=4, intermediate_size=1024),
        "encoder-decoder shape",
    )
    max_length: int = option(128, "tokens per row before corruption, <bos> and <eos> included")
    noise_density: float = option(0.15, "share of each row's tokens dropped from the encoder input")
    mean_span_length: float = option(3.0, "mean length of a dropped span")
    train: TrainConfig = option(
        TrainConfig(max_steps=1000, batch_size=32, lr=5e-4, warmup_steps=100, eval_every=250, save_every=250),
        "optimisation",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4 (<bos>, two tokens, <eos>), not {self.max_length}")
        if not 0 < self.noise_density < 1:
            raise ValueError(f"noise_density must be in (0, 1), not {self.noise_density}")
        if self.mean_span_length < 1:
            raise ValueError(f"mean_span_length must be >= 1, not {self.mean_span_length}")
        if self.extra_texts and not self.extra_fields:
            raise ValueError("extra_fields must name at least one field when extra_texts is given")


def random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive lengths, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_spans(
    length: int, noise_density: float, mean_span_length: float, max_spans: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """(start, end) of each span to drop from a row of `length` tokens, in order; at least one token stays.

    round(length * noise_density) tokens (at least 1) in round(noise / mean_span_length) spans (at least 1, at
    most `max_spans`), as T5's `random_spans_noise_mask`. NOTE: T5 always starts a row with kept tokens; here the
    kept stretches before the first span and after the last may be empty, so a row's first token can be dropped too.
    """
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_span_length), 1), max_spans, noise, length - noise + 1)
    noise_lengths = random_segmentation(noise, spans, rng)
    # spans + 1 kept stretches; the inner ones non-empty: segment two more tokens, then take one off each end.
    kept_lengths = random_segmentation(length - noise + 2, spans + 1, rng)
    kept_lengths[0] -= 1
    kept_lengths[-1] -= 1
    result, position = [], 0
    for kept, dropped in zip(kept_lengths, noise_lengths):
        position += int(kept)
        result.append((position, position + int(dropped)))
        position += int(dropped)
    return result


def corrupt(
    ids: Sequence[int], sentinels: Sequence[int], noise_density: float, mean_span_length: float, rng
) -> tuple[list[int], list[int]]:
    """(encoder tokens, target tokens) of one row of text tokens: each dropped span becomes the next sentinel in the
    encoder tokens, and the target is every sentinel followed by its span (no <bos> or <eos>: `collate`'s)."""
    inputs: list[int] = []
    target: list[int] = []
    kept_from = 0
    for sentinel, (start, end) in zip(sentinels, noise_spans(len(ids), noise_density, mean_span_length,
                                                             len(sentinels), rng)):  # fmt: skip
        inputs += [*ids[kept_from:start], sentinel]
        target += [sentinel, *ids[start:end]]
        kept_from = end
    return inputs + list(ids[kept_from:]), target


def _collate(tokenizer: Tokenizer, noise_density: float, mean_span_length: float, rows: list, rng):
    """Rows of text tokens -> corrupted `<bos> input <eos>` sources and sentinel-and-span targets, padded."""
    examples = []
    for ids in rows:
        inputs, target = corrupt(ids, tokenizer.sentinel_ids, noise_density, mean_span_length, rng)
        examples.append(([tokenizer.bos_id, *inputs, tokenizer.eos_id], target))
    return collate(tokenizer, examples)


class Concatenated:
    """Several sequences of rows read as one, in order (each may be read lazily)."""

    def __init__(self, parts: list[Sequence[list[int]]]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int) -> list[int]:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


def extra_texts(recipe: Recipe) -> dict[str, list[str]]:
    """field -> its texts in the training split of every `extra_texts` source (their held-out splits stay unseen)."""
    fields = tuple(recipe.extra_fields)
    records = [record for source in recipe.extra_texts for record in task_records(TaskData(source=source), "train",
                                                                                   fields)]  # fmt: skip
    return {name: [record[name] for record in records] for name in fields} if records else {}


def packed_rows(tokenizer: Tokenizer, texts: list[str], length: int) -> StreamRows:
    """Rows of `length` tokens cut from the texts as one `<bos> text <eos>` stream, the layout of a prepared
    folder's shards: every row is full (no padding), short texts share a row, long ones run over several."""
    ids = itertools.chain.from_iterable(encode_documents(texts, tokenizer))
    stream = np.fromiter(ids, dtype=token_dtype(tokenizer.vocab_size))
    return StreamRows(stream, length)


def training_rows(recipe: Recipe, setup: Setup) -> tuple[Tokenizer, Sequence[list[int]], list[list[int]]]:
    """(tokenizer with sentinels, training rows, validation rows) of max_length - 2 tokens (room for the encoder
    input's <bos> and <eos>): from the shards and tokenizer of a `lmforge data prepare` folder, or from texts with a
    tokenizer trained on them and on the extra texts, whose rows (one stream per field) join the training rows."""
    length, valid_count = recipe.max_length - 2, recipe.train.eval_windows * 4
    extra = extra_texts(recipe)
    if is_prepared(recipe.data.source):
        prepared = Tokenizer.load(recipe.data.source)  # the shards' own: ShardedTokens checks its fingerprint
        train, valid = (StreamRows(ShardedTokens(recipe.data.source, split, prepared), length)
                        for split in ("train", "valid"))  # fmt: skip
        tokenizer = prepared.with_sentinels()
    else:
        texts = {split: [r["text"] for r in task_records(recipe.data, split, FIELDS)] for split in ("train", "valid")}
        everything = texts["train"] + [text for field_texts in extra.values() for text in field_texts]
        tokenizer = setup.tokenizer(lambda: everything, recipe.vocab_size).with_sentinels()
        train, valid = (packed_rows(tokenizer, texts[split], length) for split in ("train", "valid"))
    # One stream per field keeps each row in one language (src rows Chinese, tgt rows English).
    rows = Concatenated([train, *(packed_rows(tokenizer, field_texts, length) for field_texts in extra.values())])
    return tokenizer, rows, [valid[index] for index in range(min(len(valid), valid_count))]


def prepare(recipe: Recipe, setup: Setup) -> Training:
    tokenizer, rows, valid_rows = training_rows(recipe, setup)
    if not valid_rows:
        raise UserError(
            f"the valid split of {recipe.data.source} holds fewer than max_length tokens: nothing to validate"
        )
    recipe.model.vocab_size = tokenizer.vocab_size
    recipe.model.max_position_embeddings = max(recipe.model.max_position_embeddings, recipe.max_length)
    spans = round(recipe.max_length * recipe.noise_density / recipe.mean_span_length)
    if spans > len(SENTINEL_TOKENS):
        print(f"NOTE: rows of {recipe.max_length} tokens would need {spans} spans; each row keeps to "
              f"{len(SENTINEL_TOKENS)} (one per sentinel), so fewer but longer spans")  # fmt: skip

    batch_collate = functools.partial(_collate, tokenizer, recipe.noise_density, recipe.mean_span_length)
    batches = ExampleBatches(rows, recipe.train.batch_size, batch_collate, seed=recipe.train.seed)
    valid_rng = np.random.default_rng(VALID_SEED)
    valid_batches = [batch_collate(chunk, valid_rng) for chunk in in_batches(valid_rows, recipe.train.batch_size)]

    torch.manual_seed(recipe.train.seed)
    model = Seq2Seq(recipe.model).to(setup.device)
    print(f"encoder-decoder (span corruption): {model.num_parameters():,} parameters on {setup.device}; "
          f"{len(rows):,} training rows; {tokenizer.vocab_size:,} tokens, {len(SENTINEL_TOKENS)} of them "
          "sentinels")  # fmt: skip

    def validate(model: Seq2Seq) -> dict[str, float]:
        loss = mean_loss(model, valid_batches)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return Training(
        model,
        tokenizer,
        batches.batch,
        validate,
        task_info={
            "task": "span",
            "noise_density": recipe.noise_density,
            "mean_span_length": recipe.mean_span_length,
            "sentinels": len(SENTINEL_TOKENS),
            "extra_texts": list(recipe.extra_texts),
        },
        max_length=recipe.max_length,
        title=f"span-corruption pretraining on {recipe.data.source}",
    )


def filled_examples(model_dir: Path, data: TaskData, split: str, count: int = 4) -> list[dict[str, str]]:
    """The first rows of a split, corrupted as validation corrupts them, beside the dropped spans and what the model
    writes in their place (greedy), sentinels shown: the report's examples."""
    task = RunFolder(model_dir).read_task()
    tokenizer = Tokenizer.load(model_dir)
    length = RunFolder(model_dir).read_recipe(default={}).get("max_length", 128) - 2
    if is_prepared(data.source):
        rows = StreamRows(ShardedTokens(data.source, split, Tokenizer.load(data.source)), length)
    else:
        rows = packed_rows(tokenizer, [r["text"] for r in task_records(data, split, FIELDS)][: count * 8], length)
    rng = np.random.default_rng(VALID_SEED)
    pairs = [corrupt(rows[index], tokenizer.sentinel_ids, task["noise_density"], task["mean_span_length"], rng)
             for index in range(min(count, len(rows)))]  # fmt: skip
    if not pairs:
        return []
    input_ids, attention_mask = pad_right(
        tokenizer, [[tokenizer.bos_id, *inputs, tokenizer.eos_id] for inputs, _ in pairs]
    )
    longest = max(len(target) for _, target in pairs) + 1
    with torch.inference_mode():
        outputs = greedy_search(
            load_model(model_dir), input_ids, attention_mask, tokenizer.bos_id, tokenizer.eos_id, longest
        )
    show = functools.partial(tokenizer.decode, skip_special_tokens=False)
    return [{"input": show(inputs), "dropped spans": show(target), "model": show(output)}
            for (inputs, target), output in zip(pairs, outputs)]  # fmt: skip


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "valid",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    """Target-token loss before and after training, on the validation corruption of metrics.jsonl."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    validations = validation_records(RunFolder(model_dir))
    before, after = validations[0], validations[-1]
    task = RunFolder(model_dir).read_task()
    extra_note = (
        [f"Also trained on the train split of {', '.join(task['extra_texts'])}."] if task.get("extra_texts") else []
    )
    metrics = {
        "task": "span",
        "steps": after["step"],
        "span_loss": after["loss"],
        "span_loss_before": before["loss"],
        "training_minutes": training_minutes,
    }
    write_task_report(
        out_dir,
        f"span-corruption pretraining — {model_dir}",
        metrics,
        [(f"step {r['step']}", r) for r in (before, after)],
        [("loss", "target-token loss"), ("perplexity", "perplexity")],
        filled_examples(model_dir, data, split),
        f"{data.source}, the {split} shards of `lmforge data prepare`"
        if is_prepared(data.source)
        else describe_split(data, split, "text"),
        [
            "Validation on the same corrupted rows (seed fixed) at every evaluation; the loss is over the "
            f"sentinels and dropped spans the decoder writes, and <eos>. ![loss]({RunFolder.LOSS_PLOT})",
            "Examples: validation rows with their spans dropped, the spans, and what the model writes for them "
            "(greedy).",
            *extra_note,
            "Start translation or summarization from this run: `lmforge finetune --task translate --base RUN`.",
        ],
    )
    return metrics


TASK = Task(
    name="span",
    Recipe=Recipe,
    fields=FIELDS,
    family="seq2seq",
    objective=seq2seq_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
    eval_split="valid",
)
