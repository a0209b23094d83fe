"""Span-corruption pretraining of an encoder-decoder (tasks/span.py), the tokenizer's sentinels, and a span run as
the `--base` of translate and summarize: its weights are the fine-tuned model's start, its tokenizer is reused."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import _write_jsonl as write_jsonl

from lmforge.config import from_dict
from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.shards import prepare_shards
from lmforge.data.sources import read_split
from lmforge.data.tokenizer import SENTINEL_TOKENS, Tokenizer
from lmforge.errors import UserError
from lmforge.models import load_model, save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks import TASKS, span, summarize, task_module, translate
from lmforge.tasks.base import Setup, run_task
from lmforge.tasks.encoding import encode_single
from lmforge.tasks.examples import TaskData
from lmforge.tasks.text_to_text import collate, encode_targets, mean_loss, text_pairs
from lmforge.train.objectives import seq2seq_loss

DIGITS = "一二三四五六七八九"
WORDS = dict(zip(DIGITS, ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
SENTINELS = list(range(1000, 1000 + len(SENTINEL_TOKENS)))
TINY_MODEL = {"hidden_size": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64, "dropout": 0.0}  # fmt: skip
TINY_TRAIN = {"batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "eval_every": 0, "save_every": 1000}


pytestmark = pytest.mark.usefixtures("one_thread")



def counting_text(rng: random.Random) -> str:
    """Counting on from a random digit ("三四五六七…"): every dropped span follows from its neighbours."""
    start = rng.randrange(9)
    return "".join(DIGITS[(start + step) % 9] for step in range(rng.randint(12, 30))) + "。"


def digit_pairs(rng: random.Random, count: int) -> list[dict]:
    pairs = []
    for _ in range(count):
        characters = rng.choices(DIGITS, k=rng.randint(2, 5))
        pairs.append({"src": "".join(characters), "tgt": " ".join(WORDS[c] for c in characters)})
    return pairs


def restore(inputs: list[int], target: list[int], sentinels: list[int] = SENTINELS) -> list[int]:
    """The row again: each sentinel of the input replaced by the tokens after it in the target."""
    spans, current = {}, None
    for token in target:
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [token for item in inputs for token in (spans[item] if item in sentinels else [item])]


def test_span_corruption_drops_15_percent_in_spans_the_target_restores():
    rng = np.random.default_rng(0)
    rows = [list(np.random.default_rng(index).integers(0, 900, length)) for index, length in
            enumerate([126] * 300 + [2, 3, 4, 5, 7, 10, 20, 40] * 20)]  # fmt: skip
    dropped = total = spans = 0
    first_dropped = 0
    for row in rows:
        inputs, target = span.corrupt(row, SENTINELS, 0.15, 3.0, rng)
        used = [token for token in inputs if token in SENTINELS]
        assert used == SENTINELS[: len(used)] and used  # one sentinel per span, in order
        assert [token for token in target if token in SENTINELS] == used
        assert target[0] == SENTINELS[0] and target[-1] not in SENTINELS
        assert not any(a in SENTINELS and b in SENTINELS for a, b in zip(target, target[1:]))  # no empty span
        assert restore(inputs, target) == row  # unmasking the target into the input gives the row back exactly
        assert len(inputs) - len(used) >= 1  # a token always stays
        first_dropped += inputs[0] == SENTINELS[0]
        if len(row) == 126:
            dropped += len(target) - len(used)
            total += len(row)
            spans += len(used)
    assert 0.145 < dropped / total < 0.155
    assert 2.7 < dropped / spans < 3.5  # mean span length ~3 (19 tokens in round(19 / 3) = 6 spans)
    assert first_dropped > 0  # the first token can be dropped too (T5 never drops it)


def test_the_batch_loss_is_the_cross_entropy_of_sentinels_spans_and_eos(tmp_path):
    texts = [counting_text(random.Random(seed)) for seed in range(60)]
    tokenizer = Tokenizer.train(texts, 300, show_progress=False).with_sentinels()
    packed = span.packed_rows(tokenizer, texts, 30)
    assert len(packed) >= 4
    rows = [packed[index] for index in range(4)]
    batch = span._collate(tokenizer, 0.15, 3.0, rows, np.random.default_rng(1))
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(**{**TINY_MODEL, "vocab_size": tokenizer.vocab_size})).eval()
    loss, tokens = seq2seq_loss(model, batch)
    by_hand, count = 0.0, 0
    for row, ids in enumerate(rows):  # one row at a time, unpadded
        source = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert source[0] == tokenizer.bos_id and source[-1] == tokenizer.eos_id
        labels = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert labels[-1] == tokenizer.eos_id and labels[0] == tokenizer.sentinel_ids[0]
        assert restore(source[1:-1].tolist(), labels[:-1].tolist(), tokenizer.sentinel_ids) == ids
        decoder_input = torch.tensor([[tokenizer.bos_id, *labels[:-1].tolist()]])
        with torch.no_grad():
            logits = model(source[None], torch.ones_like(source)[None], decoder_input)[0]  # (T, vocab)
        by_hand += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
    assert tokens == count
    assert loss.item() == pytest.approx(by_hand / count, rel=1e-5)


def test_sentinels_follow_the_last_id_and_leave_every_other_id_alone(tmp_path):
    texts = [counting_text(random.Random(seed)) + " one two three" for seed in range(40)]
    plain = Tokenizer.train(texts, 300, show_progress=False)
    assert plain.sentinel_ids is None  # tokenizers without them load and work as before
    tokenizer = plain.with_sentinels()
    assert tokenizer.sentinel_ids == list(range(plain.vocab_size, plain.vocab_size + len(SENTINEL_TOKENS)))
    assert tokenizer.encode_batch(texts) == plain.encode_batch(texts)
    assert tokenizer.encode("三<extra_id_1>四") == [*plain.encode("三"), tokenizer.sentinel_ids[1], *plain.encode("四")]
    assert tokenizer.with_sentinels() is tokenizer
    tokenizer.save(tmp_path)
    assert Tokenizer.load(tmp_path).sentinel_ids == tokenizer.sentinel_ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["additional_special_tokens"][-len(SENTINEL_TOKENS) :] == SENTINEL_TOKENS


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """Tiny translate and summarize data sets: digits to words, and a document's first words as its headline."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = random.Random(3)
    for task in ("translate", "summarize"):
        (folder / task).mkdir()
    for split, count in (("train", 120), ("valid", 16), ("test", 8)):
        write_jsonl(folder / "translate" / f"{split}.jsonl", digit_pairs(rng, count))
        documents = [counting_text(rng) + counting_text(rng) for _ in range(count)]
        write_jsonl(folder / "summarize" / f"{split}.jsonl", [{"document": d, "summary": d[:5]} for d in documents])
    return folder


@pytest.fixture(scope="module")
def span_run(pair_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("span")
    rng = random.Random(0)
    write_jsonl(folder / "text.jsonl", [{"text": counting_text(rng)} for _ in range(600)])
    recipe = from_dict(span.Recipe, {
        "data": {"source": str(folder / "text.jsonl"), "valid_fraction": 0.05, "test_fraction": 0.0},
        "extra_texts": [str(pair_data / "translate")], "vocab_size": 400, "model": TINY_MODEL, "max_length": 32,
        "device": "cpu", "train": {**TINY_TRAIN, "max_steps": 120, "eval_every": 120, "eval_windows": 4},
    })  # fmt: skip
    return run_task(span.TASK, recipe, folder / "run", progress=False), folder / "run"


def test_a_tiny_encoder_decoder_learns_to_fill_dropped_spans(span_run, pair_data):
    result, folder = span_run
    assert result["span_loss"] < result["span_loss_before"] - 1.5
    task = RunFolder(folder).read_task()
    assert task["task"] == "span" and task["sentinels"] == len(SENTINEL_TOKENS)
    assert load_model(folder).config.vocab_size == Tokenizer.load(folder).vocab_size
    # The tokenizer was trained on the extra English too: each number word is one token.
    tokenizer = Tokenizer.load(folder)
    assert all(len(tokenizer.encode(" " + word)) == 1 for word in ("three", "seven"))
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "span-corruption" in report and "dropped spans" in report and "<extra_id_0>" in report
    assert str(pair_data / "translate") in report  # the extra texts are named


def test_every_encoder_decoder_task_but_span_takes_a_base():
    modules = {name: task_module(name) for name in TASKS}
    seq2seq = {
        name for name, module in modules.items() if getattr(module, "TASK", None) and module.TASK.family == "seq2seq"
    }
    with_base = {name for name in seq2seq if "base" in {f.name for f in dataclasses.fields(modules[name].Recipe)}}
    assert seq2seq == {"span", "translate", "summarize"} and with_base == {"translate", "summarize"}


@pytest.mark.parametrize("module", [translate, summarize], ids=["translate", "summarize"])
def test_a_span_run_is_the_start_of_translate_and_summarize(module, span_run, pair_data, tmp_path):
    _, base = span_run
    values = {"data": {"source": str(pair_data / module.TASK.name)}, "base": str(base), "vocab_size": 999,
              "model": {"hidden_size": 32}, "max_source_length": 48, "max_target_length": 16, "num_beams": 1,
              "valid_examples": 0, "device": "cpu",
              "train": {**TINY_TRAIN, "max_steps": 2, "eval_every": 2}}  # fmt: skip
    recipe = from_dict(module.Recipe, values)
    training = module.TASK.prepare(recipe, Setup(RunFolder(tmp_path / "probe"), torch.device("cpu"), False, False))
    pretrained = load_model(base).state_dict()
    started = training.model.state_dict()
    assert started.keys() == pretrained.keys()
    for key, tensor in pretrained.items():
        torch.testing.assert_close(started[key], tensor, rtol=0, atol=0, msg=key)
    assert training.tokenizer.to_str() == Tokenizer.load(base).to_str()
    shape = dataclasses.replace(recipe.model, dropout=0.0)  # the base's shape; the recipe's dropout (0.1)
    assert shape == load_model(base).config and recipe.vocab_size == training.tokenizer.vocab_size
    assert recipe.model.dropout == training.model.config.dropout == 0.1

    # The first validation, before step 1, is the base model's loss on the validation pairs.
    run = tmp_path / "tuned"
    run_task(module.TASK, from_dict(module.Recipe, values), run, progress=False)
    task = RunFolder(run).read_task()
    data = TaskData(source=str(pair_data / module.TASK.name))
    sources, targets = text_pairs(data, "valid", task["source_field"], task["target_field"])
    tokenizer = Tokenizer.load(base)
    examples = list(zip(encode_single(tokenizer, sources, 48), encode_targets(tokenizer, targets, 16)))
    expected = mean_loss(load_model(base), [collate(tokenizer, examples)])
    first = next(record for record in RunFolder(run).read_metrics_log() if "valid_loss" in record)
    assert first["step"] == 0 and first["valid_loss"] == pytest.approx(expected, rel=1e-5)
    assert Tokenizer.load(run).to_str() == tokenizer.to_str()
    assert task["base"] == str(base)
    assert str(base) in (run / "report.md").read_text(encoding="utf-8")
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["base"] == str(base)


def test_a_run_from_a_base_resumes(span_run, pair_data, tmp_path):
    _, base = span_run
    values = {"data": {"source": str(pair_data / "translate")}, "base": str(base), "max_source_length": 16,
              "max_target_length": 16, "num_beams": 1, "valid_examples": 0, "device": "cpu"}  # fmt: skip
    first = from_dict(translate.Recipe, {**values, "train": {**TINY_TRAIN, "max_steps": 2, "save_every": 2}})
    run_task(translate.TASK, first, tmp_path, progress=False)
    more = from_dict(translate.Recipe, {**values, "train": {**TINY_TRAIN, "max_steps": 4}})
    run_task(translate.TASK, more, tmp_path, resume=True, progress=False)
    steps = [record["step"] for record in RunFolder(tmp_path).read_metrics_log() if "loss" in record]
    assert steps == [1, 2, 3, 4]
    assert Tokenizer.load(tmp_path).to_str() == Tokenizer.load(base).to_str()


def tiny_run_folder(folder, model, tokenizer) -> str:
    save_model(folder, model)
    tokenizer.save(folder)
    return str(folder)


def test_an_encoder_or_a_decoder_as_base_is_one_clear_error(pair_data, tmp_path):
    tokenizer = Tokenizer.train([counting_text(random.Random(seed)) for seed in range(30)], 300, show_progress=False)
    encoder = tiny_run_folder(tmp_path / "encoder", Encoder(EncoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, head="mlm"
    )), tokenizer)  # fmt: skip
    decoder = tiny_run_folder(tmp_path / "decoder", Decoder(DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )), tokenizer)  # fmt: skip
    for base, family in ((encoder, "encoder"), (decoder, "decoder"), (str(tmp_path / "nothing"), None)):
        for module in (translate, summarize):
            recipe = from_dict(module.Recipe, {"data": {"source": str(pair_data / module.TASK.name)}, "base": base,
                                               "device": "cpu"})  # fmt: skip
            with pytest.raises(UserError) as error:
                run_task(module.TASK, recipe, tmp_path / "run", progress=False)
            message = str(error.value)
            assert "\n" not in message and base in message
            if family:
                assert f"an lmforge {family} run" in message and "--task span" in message
            assert not (tmp_path / "run").exists()


def test_span_pretraining_reads_a_prepared_folder_and_adds_sentinels(pair_data, tmp_path):
    rng = random.Random(1)
    write_jsonl(tmp_path / "text.jsonl", [{"text": counting_text(rng)} for _ in range(400)])
    tokenizer = Tokenizer.train([counting_text(rng) for _ in range(200)], 300, show_progress=False)
    prepare_shards(str(tmp_path / "text.jsonl"), tokenizer, tmp_path / "shards", shard_tokens=2000,
                   valid_fraction=0.05, test_fraction=0.0, progress=False)  # fmt: skip
    values = {"data": {"source": str(tmp_path / "shards")}, "max_length": 24,
              "extra_texts": [str(pair_data / "translate")], "train": {"eval_windows": 2}}  # fmt: skip
    recipe = from_dict(span.Recipe, values)
    loaded, rows, valid_rows = span.training_rows(recipe, Setup(RunFolder(tmp_path / "run"), None, False, False))
    assert loaded.sentinel_ids == list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(SENTINEL_TOKENS)))

    # Rows of 22 tokens cut from the `<bos> text <eos>` stream, then the extra pairs' texts (both fields).
    def stream(split: str) -> list[int]:
        texts = [r["text"] for r in read_split(str(tmp_path / "text.jsonl"), split, 0.05, 0.0)]
        return [token for ids in tokenizer.encode_batch(texts, add_bos=True, add_eos=True) for token in ids]

    train, valid = stream("train"), stream("valid")
    streamed = (len(train) - 1) // 22
    assert [rows[index] for index in range(streamed)] == [train[i * 22 : (i + 1) * 22] for i in range(streamed)]
    pairs = [json.loads(line) for line in (pair_data / "translate" / "train.jsonl").read_text().splitlines()]
    chinese = span.packed_rows(loaded, [pair["src"] for pair in pairs], 22)
    english = span.packed_rows(loaded, [pair["tgt"] for pair in pairs], 22)
    assert len(rows) == streamed + len(chinese) + len(english) and len(english) > 20
    assert all(len(rows[index]) == 22 for index in range(len(rows)))  # packed: every row is full
    assert rows[streamed] == chinese[0] and rows[len(rows) - 1] == english[len(english) - 1]
    assert loaded.decode(rows[len(rows) - 1]).replace(" ", "").isalpha()  # an English row holds only English
    # At most eval_windows * 4 validation rows, from the valid shards.
    assert len(valid_rows) == min(8, (len(valid) - 1) // 22) > 0 and valid_rows[0] == valid[:22]


def test_a_summarize_recipe_with_copy_adds_a_pointer_head_to_a_span_base(span_run, pair_data, tmp_path):
    _, base = span_run
    values = {"data": {"source": str(pair_data / "summarize")}, "base": str(base), "model": {"copy": True},
              "max_source_length": 200, "device": "cpu"}  # fmt: skip
    values["model"]["dropout"] = 0.2  # the base's is 0: fine-tuning's own dropout is kept
    recipe = from_dict(summarize.Recipe, values)
    training = summarize.TASK.prepare(recipe, Setup(RunFolder(tmp_path), torch.device("cpu"), False, False))
    pretrained = load_model(base).state_dict()
    started = training.model.state_dict()
    assert training.model.config.copy and recipe.model.copy and training.model.config.dropout == 0.2
    assert {key for key in started if key not in pretrained} == {
        "copy_keys.weight", "copy_keys.bias", "copy_gate.weight", "copy_gate.bias"
    }  # fmt: skip
    assert all(torch.equal(started[key], tensor) for key, tensor in pretrained.items())
    assert recipe.max_source_length == load_model(base).config.max_position_embeddings  # cut to the base's positions
