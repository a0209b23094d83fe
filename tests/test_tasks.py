"""Encoder tasks end to end on small synthetic data: sentiment, masked LM, extractive QA, multiple choice."""

import json
import random

import numpy as np
import pytest
import torch

from lmforge.config import from_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.metrics import choice_logprobs
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks import mcq, mlm, qa, sentiment, task_module
from lmforge.tasks.examples import TaskData, task_records
from lmforge.train.trainer import TrainConfig

FILLER = "我们今天去商店买了一本书和一些水果觉得服务态度价格包装物流速度"
TINY_TRAIN = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "eval_every": 0, "save_every": 1000}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def review(rng: random.Random, positive: bool) -> dict:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
    words.insert(rng.randint(0, len(words)), "很好" if positive else "太差")
    return {"text": "".join(words), "label": int(positive)}


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, count in (("train", 400), ("valid", 60), ("test", 60)):
        write_jsonl(folder / f"{split}.jsonl", [review(rng, rng.random() < 0.5) for _ in range(count)])
    return folder


def tiny_encoder(head: str) -> dict:
    return {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "head": head, "dropout": 0.0}


def test_sentiment_learns_and_reports_beside_its_baselines(sentiment_data, tmp_path):
    recipe = from_dict(
        sentiment.Recipe,
        {
            "data": {"source": str(sentiment_data)},
            "vocab_size": 400,
            "model": tiny_encoder("classify"),
            "max_length": 32,
            "train": {**TINY_TRAIN, "max_steps": 60},
        },
    )
    metrics = sentiment.finetune(recipe, tmp_path, progress=False)
    assert metrics["accuracy"] > 0.9
    assert metrics["examples"] == 60
    assert sum(map(sum, metrics["confusion_matrix"])) == 60
    baselines = set(metrics["baselines"])
    assert baselines - {"majority class (0)", "majority class (1)"} == {
        "snownlp naive Bayes, shipped model",
        "snownlp naive Bayes, retrained on this train split",
    }
    # Bayes retrained on words that decide every label ("很好" / "太差") gets them right too.
    assert metrics["baselines"]["snownlp naive Bayes, retrained on this train split"]["accuracy"] > 0.9
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "majority class" in report and "snownlp" in report and "test.jsonl" in report
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["data_split"].endswith("test.jsonl (all records)")

    # The saved folder evaluates again to the same numbers.
    again = sentiment.evaluate_run(
        tmp_path, TaskData(source=str(sentiment_data)), "test", tmp_path / "again", None, False
    )
    assert again["accuracy"] == metrics["accuracy"]


def test_labels_unseen_in_training_are_named(sentiment_data, tmp_path):
    recipe = from_dict(
        sentiment.Recipe,
        {
            "data": {"source": str(sentiment_data)},
            "vocab_size": 300,
            "model": tiny_encoder("classify"),
            "train": {**TINY_TRAIN, "max_steps": 1},
        },
    )
    sentiment.finetune(recipe, tmp_path / "run", progress=False)
    odd = tmp_path / "odd"
    odd.mkdir()
    write_jsonl(odd / "test.jsonl", [{"text": "还行吧", "label": "neutral"}])
    with pytest.raises(UserError, match="neutral"):
        sentiment.evaluate_run(tmp_path / "run", TaskData(source=str(odd)), "test", tmp_path / "out", None, False)


def test_a_missing_field_names_the_field_and_the_record(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "好", "label": 1}, {"text": "差"}])
    with pytest.raises(UserError, match="'label' is missing in record 2"):
        task_records(TaskData(source=str(tmp_path)), "train", ("text", "label"))


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(UserError, match="sentiment"):
        task_module("sentimnet")


@pytest.fixture(scope="module")
def small_tokenizer():
    return Tokenizer.train(
        [FILLER * 3, "北京大学在北京。小明的老师名叫王芳。"] * 20, vocab_size=320, show_progress=False
    )


def test_masking_follows_bert_and_never_touches_markers_or_padding(small_tokenizer):
    rows = [[small_tokenizer.bos_id, *range(10, 10 + n), small_tokenizer.eos_id] for n in (200, 120)]
    input_ids, attention_mask = small_tokenizer.pad(rows, side="right")
    corrupted, labels = mlm.mask_tokens(input_ids, attention_mask, small_tokenizer, 0.15, np.random.default_rng(0))
    chosen = labels != mlm.IGNORE
    assert 0.10 < chosen.sum().item() / 320 < 0.20
    assert torch.equal(labels[chosen], input_ids[chosen])
    markers = (input_ids == small_tokenizer.bos_id) | (input_ids == small_tokenizer.eos_id) | (attention_mask == 0)
    assert not (chosen & markers).any()
    assert torch.equal(corrupted[~chosen], input_ids[~chosen])
    masked_share = (corrupted[chosen] == small_tokenizer.mask_id).float().mean().item()
    assert 0.65 < masked_share < 0.95


def test_masked_lm_pretraining_lowers_the_validation_loss(tmp_path):
    rng = random.Random(1)
    lines = [
        "".join(rng.choice(["北京", "上海", "人民", "日报", "经济", "发展", "。"]) for _ in range(30))
        for _ in range(300)
    ]
    write_jsonl(tmp_path / "news.jsonl", [{"text": line} for line in lines])
    recipe = from_dict(
        mlm.Recipe,
        {
            "data": {"source": str(tmp_path / "news.jsonl"), "valid_fraction": 0.1, "test_fraction": 0.0},
            "vocab_size": 300,
            "model": tiny_encoder("mlm"),
            "max_length": 32,
            "train": {**TINY_TRAIN, "max_steps": 40, "eval_every": 40, "eval_windows": 4},
        },
    )
    result = mlm.finetune(recipe, tmp_path / "run", progress=False)
    assert result["masked_loss"] < result["masked_loss_before"] - 1.0
    assert "masked-token loss" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    # The masked-LM run becomes a classifier's starting point with its backbone intact.
    from lmforge.models.bert import load_encoder

    classifier = load_encoder(tmp_path / "run", head="classify", num_labels=3)
    assert classifier.config.num_labels == 3


def test_qa_windows_map_every_answer_back_to_its_exact_characters(small_tokenizer):
    recipe = qa.Recipe(max_length=40, stride=10, max_question_tokens=8)
    context = FILLER * 4 + "小明的老师名叫王芳。" + FILLER * 2
    start = context.index("王芳")
    windows = qa.windows_of(small_tokenizer, "老师叫什么？", context, recipe)
    assert len(windows) > 3
    holding = [qa.answer_tokens(window, start, start + 2) for window in windows]
    assert any(span is not None for span in holding)
    for window, span in zip(windows, holding):
        assert len(window.input_ids) <= recipe.max_length
        if span is not None:
            first, last = (index - window.context_start for index in span)
            assert context[window.offsets[first][0] : window.offsets[last][1]] == "王芳"


def test_qa_refuses_an_answer_that_is_not_where_it_says(small_tokenizer):
    record = {"context": "北京大学在北京。", "question": "在哪？", "answers": [{"text": "上海", "answer_start": 5}]}
    with pytest.raises(UserError, match="answer_start 5"):
        qa.training_examples(small_tokenizer, [record], qa.Recipe())


def test_qa_finetune_writes_a_report(tmp_path):
    rng = random.Random(2)
    names = ["王芳", "李强", "张伟", "刘洋", "陈静"]
    records = []
    for _ in range(80):
        name = rng.choice(names)
        context = "".join(rng.choice(FILLER) for _ in range(rng.randint(5, 20))) + f"老师名叫{name}。"
        records.append(
            {
                "context": context,
                "question": "老师叫什么？",
                "answers": [{"text": name, "answer_start": context.index(name)}],
            }
        )
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", records)
    recipe = from_dict(
        qa.Recipe,
        {
            "data": {"source": str(tmp_path)},
            "vocab_size": 300,
            "model": tiny_encoder("span"),
            "max_length": 40,
            "train": {**TINY_TRAIN, "max_steps": 60, "lr": 3e-3},
        },
    )
    metrics = qa.finetune(recipe, tmp_path / "run", progress=False)
    assert metrics["f1"] > 50  # the answer always follows 名叫; an untrained model scores near 0
    assert "exact match" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_mcq_picks_the_likeliest_choice(tmp_path, small_tokenizer):
    from lmforge.generate.sampling import SamplingConfig
    from lmforge.lm import save_generation_config
    from lmforge.models import save_model

    torch.manual_seed(0)
    model = Decoder(
        DecoderConfig(
            vocab_size=small_tokenizer.vocab_size,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            intermediate_size=64,
            initializer_range=0.5,
        )
    ).eval()
    save_model(tmp_path / "model", model)
    small_tokenizer.save(tmp_path / "model")
    save_generation_config(tmp_path / "model", SamplingConfig(), small_tokenizer)
    records = [
        {"question": f"问题{i}", "choices": ["北京", "上海", "老师", "小明"], "answer": "ABCD"[i % 4]} for i in range(8)
    ]
    write_jsonl(tmp_path / "test.jsonl", records)
    metrics = mcq.evaluate_run(
        tmp_path / "model", TaskData(source=str(tmp_path)), "test", tmp_path / "out", None, False
    )
    expected = 0
    for record in records:
        context = [small_tokenizer.bos_id, *small_tokenizer.encode(mcq.prompt_of(record))]
        scores = choice_logprobs(model, context, [small_tokenizer.encode(c) for c in record["choices"]])
        expected += "ABCD"[max(range(4), key=scores.__getitem__)] == record["answer"]
    assert metrics["accuracy"] == expected / len(records)
    assert metrics["chance"] == 0.25

    write_jsonl(tmp_path / "test.jsonl", [{"question": "?", "choices": ["a", "b", "c", "d"], "answer": "E"}])
    with pytest.raises(UserError, match="'answer' one of ABCD"):
        mcq.evaluate_run(tmp_path / "model", TaskData(source=str(tmp_path)), "test", tmp_path / "out", None, False)


def test_mcq_skips_and_counts_a_record_whose_choice_alone_overflows_the_context(tmp_path, small_tokenizer):
    from lmforge.generate.sampling import SamplingConfig
    from lmforge.lm import save_generation_config
    from lmforge.models import save_model

    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=small_tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
        max_position_embeddings=256,
    )  # fmt: skip
    save_model(tmp_path / "model", Decoder(config))
    small_tokenizer.save(tmp_path / "model")
    save_generation_config(tmp_path / "model", SamplingConfig(), small_tokenizer)
    long_choice = ""
    while len(small_tokenizer.encode(long_choice)) < 300:
        long_choice += f"第{len(long_choice)}条北京上海"
    assert 300 <= len(small_tokenizer.encode(long_choice)) < 320
    records = [
        {"question": "哪个城市？", "choices": ["北京", "上海", "老师", "小明"], "answer": "A"},
        {"question": "长选项", "choices": ["北京", long_choice, "老师", "小明"], "answer": "B"},  # 300 tokens > 256
        {"question": "问" * 400, "choices": ["北京", "上海", "老师", "小明"], "answer": "C"},  # the question is cut
    ]
    write_jsonl(tmp_path / "test.jsonl", records)
    metrics = mcq.evaluate_run(
        tmp_path / "model", TaskData(source=str(tmp_path)), "test", tmp_path / "out", None, False
    )
    assert metrics["examples"] == 2 and metrics["skipped"] == 1
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "1 of 3 records were skipped" in report
    write_jsonl(tmp_path / "test.jsonl", records[1:2])
    with pytest.raises(UserError, match="nothing to score in the test split; 1 of 1 records were skipped"):
        mcq.evaluate_run(tmp_path / "model", TaskData(source=str(tmp_path)), "test", tmp_path / "out", None, False)


def test_train_config_defaults_of_a_task_recipe_survive_a_partial_override():
    recipe = from_dict(sentiment.Recipe, {"train": {"max_steps": 5}})
    assert recipe.train == TrainConfig(**{**sentiment.Recipe().train.__dict__, "max_steps": 5})
