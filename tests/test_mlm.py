"""Masked-LM pretraining (tasks/mlm.py) with whole-word masking (data/words.py) or ELECTRA's replaced-token
detection, and an mlm run folder as the `--base` of every encoder task: its weights (ELECTRA: the discriminator's)
are the fine-tuned encoder's starting weights, its tokenizer is reused."""

import dataclasses
import json
import math
import random

import jieba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_whole_and_in_parts

from lmforge.config import from_dict
from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.shards import prepare_shards
from lmforge.data.sources import read_split
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.words import WordGroups
from lmforge.models import load_model
from lmforge.models.bert import OUR_HEAD_PREFIXES
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import RunFolder, load_tensors
from lmforge.tasks import TASKS, mlm, qa, sentiment, task_module
from lmforge.tasks.base import Setup, run_task, validation_records
from lmforge.tasks.examples import TaskData, task_records
from lmforge.train.objectives import masked_lm_loss

TINY_TRAIN = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "eval_every": 0, "save_every": 1000}


def tiny_encoder(head: str) -> dict:
    return {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "head": head, "dropout": 0.0}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


@pytest.fixture(scope="module")
def news():
    """People's Daily texts (the built-in corpus's validation split, ~20k characters)."""
    records = task_records(TaskData(source="builtin:peoples-daily", valid_fraction=0.01, test_fraction=0.01), "valid",
                           ("text",))  # fmt: skip
    return [record["text"] for record in records]


@pytest.fixture(scope="module")
def news_tokenizer(news):
    # A small vocabulary: many words take several tokens, and some tokens straddle two words ("，广").
    return Tokenizer.train(news, vocab_size=1200, show_progress=False)


def masked_rows(tokenizer: Tokenizer, texts: list[str], masking: str, probability: float, seed: int):
    rows = [[tokenizer.bos_id, *ids[:126], tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    words = WordGroups(tokenizer) if masking == "whole_word" else None
    return mlm._collate(tokenizer, probability, words, rows, np.random.default_rng(seed))


def split_words(tokenizer: Tokenizer, texts: list[str], batch: dict) -> tuple[int, int]:
    """(jieba words of two or more tokens, those the masks split), through the tokenizer's own offsets."""
    chosen = batch["labels"] != IGNORE_INDEX
    multi_token = split = 0
    for row, text in enumerate(texts):
        ids, offsets = tokenizer.encode_with_offsets(text)
        offsets = offsets[:126]
        for _, start, end in jieba.tokenize(text):
            if end > offsets[-1][1]:
                continue  # not wholly inside the row: the row's cut end is a different text
            # Input position 1 + k holds token k (position 0 is <bos>).
            covering = [1 + k for k, (first, last) in enumerate(offsets) if first < end and last > start]
            if len(covering) < 2:
                continue
            multi_token += 1
            picked = {bool(chosen[row, position]) for position in covering}
            split += len(picked) == 2
    return multi_token, split


def test_whole_word_masks_never_split_a_jieba_word(news, news_tokenizer):
    texts = news[:60]
    for seed in range(3):
        batch = masked_rows(news_tokenizer, texts, "whole_word", 0.3, seed)
        multi_token, split = split_words(news_tokenizer, texts, batch)
        assert multi_token > 300 and split == 0
    # The check can fail: token masking splits words.
    assert split_words(news_tokenizer, texts, masked_rows(news_tokenizer, texts, "token", 0.3, 0))[1] > 30


def test_word_groups_hold_for_windows_that_cut_a_character(news_tokenizer):
    text = "北京大学的老师名叫王芳，我们今天去商店买了一本书。"
    ids = news_tokenizer.encode(text)
    pieces = news_tokenizer.token_bytes()
    cut = next(i for i, token in enumerate(ids) if len(pieces[token]) % 3)  # a token ending inside a character
    window = ids[cut + 1 :]  # starts with the rest of that character
    starts = WordGroups(news_tokenizer)(window)
    assert len(starts) == len(window) and all(
        starts[t] <= t and starts[starts[t]] == starts[t] for t in range(len(window))
    )
    # Special tokens are their own units and end a run of words.
    wrapped = WordGroups(news_tokenizer)([news_tokenizer.bos_id, *ids, news_tokenizer.eos_id, *ids])
    assert wrapped[0] == 0 and wrapped[len(ids) + 1] == len(ids) + 1 and wrapped[len(ids) + 2] == len(ids) + 2


def test_whole_word_masking_keeps_the_configured_rate_and_bert_replacements(news, news_tokenizer):
    batch = masked_rows(news_tokenizer, news, "whole_word", 0.15, 0)
    original = masked_rows(news_tokenizer, news, "token", 0.0, 0)["input_ids"]  # nothing chosen: the true ids
    chosen = batch["labels"] != IGNORE_INDEX
    candidates = (batch["attention_mask"] == 1) & (original != news_tokenizer.bos_id)
    candidates &= original != news_tokenizer.eos_id
    assert not (chosen & ~candidates).any()
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.15) < 0.02  # ~13k candidate tokens
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    masked = (batch["input_ids"][chosen] == news_tokenizer.mask_id).float().mean().item()
    kept = (batch["input_ids"][chosen] == original[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.04 and 0.06 < kept < 0.16  # kept: the 10% left alone plus random hits


def test_masked_lm_loss_on_whole_word_masks_equals_its_definition(news, news_tokenizer):
    batch = masked_rows(news_tokenizer, news[:6], "whole_word", 0.15, 1)
    torch.manual_seed(0)
    config = from_dict(EncoderConfig, {**tiny_encoder("mlm"), "vocab_size": news_tokenizer.vocab_size})
    model = Encoder(config).eval()
    loss, tokens = masked_lm_loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, vocab): the head on every position
    terms = [
        -F.log_softmax(logits[row, position], dim=-1)[batch["labels"][row, position]]
        for row in range(logits.shape[0])
        for position in range(logits.shape[1])
        if batch["labels"][row, position] != IGNORE_INDEX
    ]
    assert len(terms) > 20
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
    assert tokens == int(batch["attention_mask"].sum())


def test_electra_batches_are_the_masked_lm_batches_plus_the_generator_draws(news, news_tokenizer):
    rows = [[news_tokenizer.bos_id, *ids[:62], news_tokenizer.eos_id] for ids in news_tokenizer.encode_batch(news[:8])]
    words = WordGroups(news_tokenizer)
    plain = mlm._collate(news_tokenizer, 0.15, words, rows, np.random.default_rng(3))
    electra = mlm._collate(news_tokenizer, 0.15, words, rows, np.random.default_rng(3), draws=True)
    assert all(torch.equal(plain[key], electra[key]) for key in plain)  # whole-word masks, unchanged
    assert electra["draws"].shape == plain["input_ids"].shape and electra["draws"].dtype == torch.float32
    assert electra["draws"].min() >= 0 and electra["draws"].max() < 1 and electra["draws"].std() > 0.25


@pytest.fixture(scope="module")
def mlm_run(news, tmp_path_factory):
    """A tiny whole-word masked-LM run on 10 People's Daily articles, seen many times (so 150 steps learn them)."""
    folder = tmp_path_factory.mktemp("mlm")
    write_jsonl(folder / "train.jsonl", [{"text": text} for text in news[:10] * 16])
    write_jsonl(folder / "valid.jsonl", [{"text": text} for text in news[:10]])
    recipe = from_dict(
        mlm.Recipe,
        {
            "data": {"source": str(folder)},
            "vocab_size": 600,
            "model": tiny_encoder("mlm"),
            "max_length": 64,
            "masking": "whole_word",
            "device": "cpu",
            "train": {**TINY_TRAIN, "max_steps": 150, "eval_every": 150, "eval_windows": 4},
        },
    )
    return run_task(mlm.TASK, recipe, folder / "run", progress=False), folder / "run"


def test_a_tiny_encoder_learns_with_whole_word_masking(mlm_run):
    result, folder = mlm_run
    assert result["masked_loss"] < result["masked_loss_before"] - 1.0
    assert json.loads((folder / "task.json").read_text())["masking"] == "whole_word"


@pytest.fixture(scope="module")
def pattern_data(tmp_path_factory):
    """A repeated pattern: every text the same 20 characters, so that 100 steps can learn where a token is out of
    place (the replacements themselves are new at every step: masks and samples differ)."""
    folder = tmp_path_factory.mktemp("pattern")
    pattern = "春夏秋冬东南西北金木水火土"
    text = (pattern * 2)[:20]
    write_jsonl(folder / "train.jsonl", [{"text": text}] * 160)
    write_jsonl(folder / "valid.jsonl", [{"text": text}] * 10)
    return folder


def electra_recipe(data, **train) -> mlm.Recipe:
    # A small vocabulary keeps most characters as several byte tokens: rows of ~60 tokens.
    return from_dict(mlm.Recipe, {
        "data": {"source": str(data)}, "vocab_size": 280, "objective": "replaced_token_detection",
        "model": tiny_encoder("mlm"), "max_length": 64, "device": "cpu",
        "train": {**TINY_TRAIN, "lr": 1e-3, "eval_windows": 4, **train},
    })  # fmt: skip


@pytest.fixture(scope="module")
def electra_run(pattern_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("electra") / "run"
    recipe = electra_recipe(pattern_data, max_steps=100, eval_every=100, save_every=100)
    return run_task(mlm.TASK, recipe, folder, progress=False), folder


def test_a_tiny_electra_learns_to_detect_replaced_tokens(electra_run):
    result, folder = electra_run
    last = validation_records(RunFolder(folder))[-1]
    assert result["discriminator_loss"] == last["discriminator_loss"] < 0.2 * result["discriminator_loss_before"]
    # Better than knowing only how many tokens are replaced (the entropy of that share) ...
    share = last["replaced_share"]
    assert 0.05 < share < 0.15  # 15% masked, minus the samples that reproduce the original token
    assert last["discriminator_loss"] < 0.5 * -(share * math.log(share) + (1 - share) * math.log(1 - share))
    # ... it finds the replaced tokens, and the generator learned the pattern too.
    assert last["replaced_recall"] > 0.8 and last["replaced_precision"] > 0.8 and result["replaced_f1"] > 0.8
    assert result["generator_accuracy"] > 0.5

    # The run folder's encoder is the discriminator: the last checkpoint's discriminator, tensor for tensor.
    saved = load_model(folder).state_dict()
    checkpoint = load_tensors(sorted(RunFolder(folder).checkpoints.glob("step_*"))[-1] / RunFolder.WEIGHTS)
    discriminator = {
        name.removeprefix("discriminator."): tensor
        for name, tensor in checkpoint.items()
        if name.startswith("discriminator.")
    }
    assert saved.keys() == discriminator.keys()
    assert all(torch.equal(saved[name], discriminator[name]) for name in saved)
    assert any(name.startswith("generator.layers.") for name in checkpoint)  # resume needs the generator too
    config = RunFolder(folder).read_config()
    assert config["family"] == "encoder" and config["head"] == "replaced_token" and config["hidden_size"] == 64
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "replaced-token detection (ELECTRA)" in report and "replaced-token F1" in report


def test_a_resumed_electra_run_equals_an_uninterrupted_one(pattern_data, tmp_path):
    def recipe(steps: int) -> mlm.Recipe:
        # A constant learning rate: the stopped run's schedule must not depend on its shorter max_steps.
        values = {"max_steps": steps, "save_every": 2, "warmup_steps": 0, "min_lr_ratio": 1.0}
        recipe = electra_recipe(pattern_data, **values)
        recipe.model.dropout = 0.1  # so the restored random state matters as well as the batches' draws
        return recipe

    run_whole_and_in_parts(mlm.TASK, recipe, tmp_path)
    for path in ("model.safetensors", "checkpoints/step_00000004/model.safetensors"):  # generator included
        whole, parts = (load_tensors(tmp_path / name / path) for name in ("whole", "parts"))
        assert whole.keys() == parts.keys() and all(torch.equal(whole[key], parts[key]) for key in whole)


def qa_record(rng: random.Random, text: str) -> dict:
    start = rng.randrange(0, max(len(text) - 4, 1))
    return {
        "context": text,
        "question": "哪几个字？",
        "answers": [{"text": text[start : start + 3], "answer_start": start}],
    }


@pytest.fixture(scope="module")
def encoder_task_data(news, tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("encoder_tasks")
    for task in ("sentiment", "qa"):
        (folder / task).mkdir()
    for split, texts in (("train", news[20:60]), ("valid", news[60:70]), ("test", news[70:80])):
        texts = [text[:60] for text in texts]
        write_jsonl(folder / "sentiment" / f"{split}.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
        write_jsonl(folder / "qa" / f"{split}.jsonl", [qa_record(rng, text) for text in texts])
    return folder


ENCODER_TASKS = {  # every task of family "encoder" whose recipe has `base`
    "sentiment": (sentiment, "classification_head."),
    "qa": (qa, "span_head."),
}


def test_every_encoder_task_with_a_base_is_listed():
    modules = {name: task_module(name) for name in TASKS}
    encoder = {
        name for name, module in modules.items() if getattr(module, "TASK", None) and module.TASK.family == "encoder"
    }
    with_base = {
        name for name in encoder if "base" in {field.name for field in dataclasses.fields(modules[name].Recipe)}
    }
    assert with_base == set(ENCODER_TASKS) and encoder == {*ENCODER_TASKS, "mlm"}


PRETRAINING_RUNS = {"masked_lm": "mlm_run", "replaced_token_detection": "electra_run"}  # fixtures


@pytest.mark.parametrize("objective", sorted(PRETRAINING_RUNS))
@pytest.mark.parametrize("name", sorted(ENCODER_TASKS))
def test_an_mlm_run_is_the_starting_encoder_of_every_encoder_task(
    name, objective, request, encoder_task_data, tmp_path
):
    _, base = request.getfixturevalue(PRETRAINING_RUNS[objective])
    module, head = ENCODER_TASKS[name]
    values = {"data": {"source": str(encoder_task_data / name)}, "base": str(base), "max_length": 64, "device": "cpu",
              "train": {**TINY_TRAIN, "max_steps": 2}}  # fmt: skip
    recipe = from_dict(module.Recipe, values)
    training = module.TASK.prepare(recipe, Setup(RunFolder(tmp_path / "run"), torch.device("cpu"), False, False))
    pretrained = load_model(base, torch.device("cpu")).state_dict()
    started = training.model.state_dict()
    backbone = [key for key in pretrained if not key.startswith(OUR_HEAD_PREFIXES)]
    assert len(backbone) > 20 and all(key in started for key in backbone)
    for key in backbone:
        torch.testing.assert_close(started[key], pretrained[key], rtol=0, atol=0, msg=key)
    assert any(key.startswith(head) for key in started)  # a new head of the task's kind
    assert training.tokenizer.to_str() == Tokenizer.load(base).to_str()

    # Fine-tuning runs from there, and the run folder keeps the base's tokenizer.
    recipe = from_dict(module.Recipe, {**values, **({"baselines": "none"} if name == "sentiment" else {})})
    run_task(module.TASK, recipe, tmp_path / "tuned", progress=False)
    assert Tokenizer.load(tmp_path / "tuned").to_str() == Tokenizer.load(base).to_str()
    tuned = load_model(tmp_path / "tuned", torch.device("cpu")).state_dict()
    assert not torch.equal(tuned["embeddings.word_embeddings.weight"], pretrained["embeddings.word_embeddings.weight"])


def test_masked_lm_reads_the_shards_of_a_prepared_folder(news, news_tokenizer, tmp_path):
    write_jsonl(tmp_path / "news.jsonl", [{"text": text} for text in news])
    prepare_shards(str(tmp_path / "news.jsonl"), news_tokenizer, tmp_path / "shards", shard_tokens=5000,
                   valid_fraction=0.005, test_fraction=0.0, progress=False)  # fmt: skip
    values = {"data": {"source": str(tmp_path / "shards")}, "model": tiny_encoder("mlm"), "max_length": 64,
              "masking": "whole_word", "device": "cpu",
              "train": {**TINY_TRAIN, "max_steps": 30, "eval_every": 30}}  # fmt: skip
    recipe = from_dict(mlm.Recipe, values)
    tokenizer, rows, valid_rows = mlm.training_rows(recipe, Setup(RunFolder(tmp_path / "run"), None, False, False))
    assert tokenizer.to_str() == news_tokenizer.to_str()
    # The rows are the training documents as one `<bos> text <eos>` stream, cut every 64 tokens.
    # (The texts come from the corpus's 1% validation band of hashes: a 0.5% band splits them about in half.)
    train_texts = [record["text"] for record in read_split(str(tmp_path / "news.jsonl"), "train", 0.005, 0.0)]
    stream = [token for ids in news_tokenizer.encode_batch(train_texts, add_bos=True, add_eos=True) for token in ids]
    assert len(rows) == (len(stream) - 1) // 64 > 80
    assert all(rows[index] == stream[index * 64 : (index + 1) * 64] for index in (0, 1, len(rows) // 2, len(rows) - 1))
    assert valid_rows and all(len(row) == 64 for row in valid_rows)

    result = run_task(mlm.TASK, from_dict(mlm.Recipe, values), tmp_path / "run", progress=False)
    assert result["masked_loss"] < result["masked_loss_before"]
    assert "shards of `lmforge data prepare`" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_qa_with_question_match_grows_the_base_segments_by_a_copy_of_the_context_one(
    mlm_run, encoder_task_data, tmp_path
):
    _, base = mlm_run
    values = {"data": {"source": str(encoder_task_data / "qa")}, "base": str(base), "max_length": 64, "device": "cpu",
              "question_match": True, "train": {**TINY_TRAIN, "max_steps": 2}}  # fmt: skip
    training = qa.TASK.prepare(from_dict(qa.Recipe, values), Setup(RunFolder(tmp_path / "run"), None, False, False))
    segments = training.model.embeddings.token_type_embeddings.weight
    pretrained = load_model(base, torch.device("cpu")).embeddings.token_type_embeddings.weight
    torch.testing.assert_close(segments, torch.cat([pretrained, pretrained[1:]]), rtol=0, atol=0)
    assert training.model.config.type_vocab_size == 3
