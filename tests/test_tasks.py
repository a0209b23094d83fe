"""Tasks end to end on small synthetic data: sentiment, masked LM, extractive QA, multiple choice, and the run
folder that run_task writes for every task (the same files, resumed runs plotted and reported over every step)."""

import json
import random

import numpy as np
import pytest
import torch

from lmforge.config import from_dict
from lmforge.data.sources import split_of
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.metrics import choice_logprobs
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks import (
    base,
    causal_lm,
    chat,
    distill,
    dpo,
    mcq,
    mlm,
    qa,
    sentiment,
    summarize,
    task_module,
    translate,
)
from lmforge.tasks.base import run_task
from lmforge.tasks.encoding import encode_single
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
    metrics = run_task(sentiment.TASK, recipe, tmp_path, progress=False)
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
    # Explained examples: the word that decides each label is the strongest one for the prediction.
    explained = report.split("## Explained examples")[1].split("## Examples")[0]
    rows = [line.split(" | ") for line in explained.splitlines() if line.startswith("| ") and "predicted" not in line]
    assert len(rows) == 4
    for row in rows:
        strongest, decisive = row[2].split(" (")[0], "很好" if row[1] == "1" else "太差"
        # A BPE token may hold the word with a neighbouring character ("太差水"), or a part of it.
        assert strongest and (decisive in strongest or strongest in decisive), row
    assert json.loads((tmp_path / "metrics.json").read_text())["data_split"].endswith("test.jsonl (all records)")

    # The saved folder evaluates again to the same numbers.
    again = sentiment.evaluate_run(
        tmp_path, TaskData(source=str(sentiment_data)), "test", tmp_path / "again", None, False
    )
    assert again["accuracy"] == metrics["accuracy"]


def test_a_first_phase_on_another_labelled_source_is_what_teaches_the_classifier(sentiment_data, tmp_path):
    # The task's own training split is two texts and the main phase one warm-up step: what the classifier knows at
    # the end, it learnt in the first phase on the other source's 400 reviews.
    few = tmp_path / "few"
    few.mkdir()
    write_jsonl(few / "train.jsonl", [{"text": "很好", "label": 1}, {"text": "太差", "label": 0}])
    for split in ("valid", "test"):
        (few / f"{split}.jsonl").write_text((sentiment_data / f"{split}.jsonl").read_text("utf-8"), "utf-8")
    shared = {
        "data": {"source": str(few)},
        "vocab_size": 300,
        "model": tiny_encoder("classify"),
        "max_length": 32,
        "baselines": "none",
        "train": {**TINY_TRAIN, "max_steps": 1},
    }
    with_first = from_dict(
        sentiment.Recipe,
        {**shared, "first_phase_source": str(sentiment_data / "train.jsonl"), "first_phase_steps": 60},
    )
    metrics = run_task(sentiment.TASK, with_first, tmp_path / "first", progress=False)
    assert metrics["accuracy"] > 0.9
    assert (tmp_path / "first" / "warm-up").is_dir()
    without = run_task(sentiment.TASK, from_dict(sentiment.Recipe, shared), tmp_path / "without", progress=False)
    assert without["accuracy"] < 0.75

    odd = tmp_path / "odd.jsonl"
    write_jsonl(odd, [{"text": "还行吧", "label": "neutral"}] * 20)
    recipe = from_dict(sentiment.Recipe, {**shared, "first_phase_source": str(odd), "first_phase_steps": 5})
    with pytest.raises(UserError, match="neutral"):
        run_task(sentiment.TASK, recipe, tmp_path / "odd", progress=False)
    with pytest.raises(UserError, match="first_phase_source"):
        run_task(
            sentiment.TASK,
            from_dict(sentiment.Recipe, {**shared, "first_phase_steps": 5}),
            tmp_path / "no",
            progress=False,
        )


def test_keep_tail_keeps_the_end_of_a_long_text_where_its_verdict_is(tmp_path):
    rng = random.Random(1)

    def long_review() -> dict:  # 40 characters of filler, then the verdict: past max_length's 16 tokens
        positive = rng.random() < 0.5
        return {"text": "".join(rng.choice(FILLER) for _ in range(40)) + ("很好" if positive else "太差"),
                "label": int(positive)}  # fmt: skip

    for split, count in (("train", 300), ("valid", 40), ("test", 60)):
        write_jsonl(tmp_path / f"{split}.jsonl", [long_review() for _ in range(count)])
    shared = {"data": {"source": str(tmp_path)}, "vocab_size": 300, "model": tiny_encoder("classify"),
              "max_length": 16, "baselines": "none", "train": {**TINY_TRAIN, "max_steps": 60}}  # fmt: skip
    tail = run_task(sentiment.TASK, from_dict(sentiment.Recipe, {**shared, "keep_tail": 4}), tmp_path / "tail",
                    progress=False)  # fmt: skip
    assert tail["accuracy"] > 0.9
    # The saved run cuts test texts the way it was trained: its task.json keeps keep_tail.
    again = sentiment.evaluate_run(tmp_path / "tail", TaskData(source=str(tmp_path)), "test", tmp_path / "again",
                                   None, False)  # fmt: skip
    assert again["accuracy"] == tail["accuracy"]
    cut_end = run_task(sentiment.TASK, from_dict(sentiment.Recipe, shared), tmp_path / "end", progress=False)
    assert cut_end["accuracy"] < 0.75

    tokenizer = Tokenizer.load(tmp_path / "tail")
    ids = tokenizer.encode("很好" * 30)
    [row] = encode_single(tokenizer, ["很好" * 30], 10, tail=3)
    assert row == [tokenizer.bos_id, *ids[:5], *ids[-3:], tokenizer.eos_id]
    with pytest.raises(UserError, match="tail"):
        encode_single(tokenizer, ["很好"], 10, tail=8)


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
    run_task(sentiment.TASK, recipe, tmp_path / "run", progress=False)
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
    chosen = labels != mlm.IGNORE_INDEX
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
    result = run_task(mlm.TASK, recipe, tmp_path / "run", progress=False)
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


def test_qa_question_match_marks_the_context_tokens_in_pairs_the_question_holds(small_tokenizer):
    assert qa.question_matches([1, 2, 3, 9], [5, 1, 2, 6, 3, 9, 2, 7]) == [0, 1, 1, 0, 1, 1, 0, 0]  # a lone 2: no
    recipe = qa.Recipe(max_length=128, question_match=True)
    question, context = "小明的老师叫什么？", "王芳是小明的老师，她叫王芳。"
    (window,) = qa.windows_of(small_tokenizer, question, context, recipe)
    matched = qa.question_matches(small_tokenizer.encode(question), small_tokenizer.encode(context))
    assert window.token_type_ids[: window.context_start] == [0] * window.context_start
    assert window.token_type_ids[window.context_start :] == [1 + m for m in matched] + [1]
    segments = window.token_type_ids[window.context_start :]
    marked = [span for span, segment in zip(window.offsets, segments) if segment == 2]
    covered = {index for start, end in marked for index in range(start, end)}
    phrase = context.index("小明的老师")
    assert set(range(phrase, phrase + 5)) <= covered  # the phrase the question restates
    assert not covered & {0, 1, len(context) - 3, len(context) - 2}  # never the answer, 王芳
    (plain,) = qa.windows_of(small_tokenizer, question, context, qa.Recipe(max_length=128))
    assert plain.token_type_ids == [1 if t == 2 else t for t in window.token_type_ids]


def test_a_loaded_encoder_given_the_match_segment_answers_as_before_until_fine_tuned():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**tiny_encoder("span"), vocab_size=50)).eval()
    input_ids = torch.randint(5, 50, (2, 12))
    segments = torch.tensor([[0] * 4 + [1, 2, 1, 2, 2, 1, 1, 1]] * 2)
    before = model(input_ids, None, segments.clamp(max=1))
    qa.add_match_segment(model)
    assert model.config.type_vocab_size == 3 and model.embeddings.token_type_embeddings.num_embeddings == 3
    torch.testing.assert_close(model(input_ids, None, segments), before, rtol=0, atol=0)


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
    metrics = run_task(qa.TASK, recipe, tmp_path / "run", progress=False)
    assert metrics["f1"] > 50  # the answer always follows 名叫; an untrained model scores near 0
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "exact match" in report and "best clause" in report
    # The best clause is all of a context before its "。": the answer and the filler before it.
    assert 5 < metrics["baselines"]["best clause"]["f1"] < 40 < metrics["f1"]

    # With a cloze phase first and cloze windows among the real ones, the run still learns the real questions.
    recipe.cloze_steps, recipe.cloze_share = 10, 0.3
    metrics = run_task(qa.TASK, recipe, tmp_path / "cloze", progress=False)
    cloze_log = RunFolder(tmp_path / "cloze" / "warm-up").read_metrics_log()
    assert max(r["step"] for r in cloze_log) == 10 and metrics["f1"] > 50

    # A soup of two members, both from the cloze phase's end: the phase runs once, the second member in members/1.
    recipe.train.soup = 2
    metrics = run_task(qa.TASK, recipe, tmp_path / "soup", progress=False)
    member = RunFolder(tmp_path / "soup" / RunFolder.MEMBERS / "1")
    assert max(r["step"] for r in member.read_metrics_log()) == recipe.train.max_steps and metrics["f1"] > 50
    assert not (member / RunFolder.WARM_UP).exists() and (tmp_path / "soup" / RunFolder.WARM_UP).is_dir()


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


# Every training job goes through run_task, so every run folder holds the same files.
COMMON_FILES = {
    RunFolder.METRICS_LOG, RunFolder.LOSS_PLOT, RunFolder.REPORT, RunFolder.METRICS, RunFolder.TENSORBOARD,
    RunFolder.RECIPE, RunFolder.TASK, RunFolder.CONFIG, RunFolder.WEIGHTS, RunFolder.TOKENIZER,
    RunFolder.TOKENIZER_CONFIG, RunFolder.CHECKPOINTS, RunFolder.CHECKSUMS,
}  # fmt: skip
TWO_STEPS = {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "save_every": 1000, "eval_windows": 2}
TINY_DECODER = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
TINY_SEQ2SEQ = {
    "hidden_size": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "intermediate_size": 64,
}  # fmt: skip


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """Small local data in each task's format."""
    folder = tmp_path_factory.mktemp("task-data")
    rng = random.Random(3)
    words = ["北京", "上海", "人民", "日报", "经济", "。"]
    lines = ["".join(rng.choice(words) for _ in range(20)) for _ in range(1000)]
    write_jsonl(folder / "text.jsonl", [{"text": line} for line in lines])
    splits = {"sentiment": [review(rng, index % 2 == 0) for index in range(24)]}
    splits["qa"] = [
        {"context": f"{FILLER[:index]}老师名叫王芳。", "question": "老师叫什么？",
         "answers": [{"text": "王芳", "answer_start": index + 4}]}
        for index in range(1, 13)
    ]  # fmt: skip
    splits["translate"] = [{"src": "一二三"[: 1 + i % 3], "tgt": " ".join(["one", "two", "three"][: 1 + i % 3])}
                           for i in range(12)]  # fmt: skip
    splits["summarize"] = [{"document": line[:30] + "。" + line[30:], "summary": line[:8]} for line in lines[:12]]
    for task, records in splits.items():
        (folder / task).mkdir()
        for split in ("train", "valid", "test"):
            write_jsonl(folder / task / f"{split}.jsonl", records)
    return folder


def tiny_recipes(data, chat_data, base_run) -> dict:
    """name -> (task module, recipe values): a couple of steps each, on CPU."""
    seq2seq = {"vocab_size": 300, "model": TINY_SEQ2SEQ, "max_target_length": 8, "num_beams": 1, "valid_examples": 2}
    return {
        "pretrain": (causal_lm, {"data": {"source": str(data / "text.jsonl"), "vocab_size": 300, "context": 16,
                                          "valid_fraction": 0.1}, "model": TINY_DECODER}),
        "mlm": (mlm, {"data": {"source": str(data / "text.jsonl"), "valid_fraction": 0.1}, "vocab_size": 300,
                      "model": tiny_encoder("mlm"), "max_length": 24}),
        "sentiment": (sentiment, {"data": {"source": str(data / "sentiment")}, "vocab_size": 300,
                                  "model": tiny_encoder("classify"), "max_length": 24}),
        "qa": (qa, {"data": {"source": str(data / "qa")}, "vocab_size": 300, "model": tiny_encoder("span"),
                    "max_length": 40}),
        "span": (task_module("span"), {"data": {"source": str(data / "text.jsonl"), "valid_fraction": 0.1},
                                       "vocab_size": 300, "model": TINY_SEQ2SEQ, "max_length": 24}),
        "translate": (translate, {"data": {"source": str(data / "translate")}, **seq2seq}),
        "summarize": (summarize, {"data": {"source": str(data / "summarize")}, **seq2seq}),
        "chat": (chat, {"data": {"source": str(chat_data)}, "base": str(base_run), "lora": {"rank": 2},
                        "max_new_tokens": 2}),
        "dpo": (dpo, {"data": {"source": str(chat_data), "max_eval_examples": 4}, "base": str(base_run),
                      "max_new_tokens": 2}),
        "distill": (distill, {"data": {"source": str(data / "text.jsonl")}, "teacher": str(base_run), "context": 16,
                              "model": {**TINY_DECODER, "max_position_embeddings": 64}, "eval_windows": 2}),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["pretrain", "mlm", "sentiment", "qa", "span", "translate", "summarize", "chat",
                                  "dpo", "distill"])  # fmt: skip
def test_every_task_writes_the_same_run_folder(name, task_data, chat_data, base_run, tmp_path):
    module, values = tiny_recipes(task_data, chat_data, base_run)[name]
    recipe = from_dict(module.TASK.Recipe, {**values, "train": TWO_STEPS, "device": "cpu"})
    run_task(module.TASK, recipe, tmp_path, progress=False)
    files = {path.name for path in tmp_path.iterdir()}
    extra = {RunFolder.GENERATION} if module.TASK.family == "decoder" else set()
    if name == "chat":
        extra |= {RunFolder.ADAPTER_CONFIG, RunFolder.ADAPTER_WEIGHTS}
    known = {value for key, value in vars(RunFolder).items() if key.isupper() and isinstance(value, str)}
    assert files & known == COMMON_FILES | extra
    assert RunFolder(tmp_path).read_task()["task"] == name
    steps = [record["step"] for record in RunFolder(tmp_path).read_metrics_log() if "loss" in record]
    assert steps == [1, 2]


def test_a_resumed_run_plots_and_reports_every_step(task_data, tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(base, "plot_losses", lambda records, path, title: plotted.append(list(records)))
    values = {"data": {"source": str(task_data / "text.jsonl"), "valid_fraction": 0.1}, "vocab_size": 300,
              "model": tiny_encoder("mlm"), "max_length": 24, "device": "cpu"}  # fmt: skip
    first = from_dict(mlm.Recipe, {**values, "train": {**TWO_STEPS, "max_steps": 3, "save_every": 3, "eval_every": 3}})
    before = run_task(mlm.TASK, first, tmp_path, progress=False)
    tokenizer = RunFolder(tmp_path).tokenizer.read_bytes()
    more = from_dict(mlm.Recipe, {**values, "train": {**TWO_STEPS, "max_steps": 5, "eval_every": 5}})
    after = run_task(mlm.TASK, more, tmp_path, resume=True, progress=False)
    assert [r["step"] for r in plotted[-1] if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in plotted[-1] if "valid_loss" in r] == [0, 3, 5]
    assert after["masked_loss_before"] == before["masked_loss_before"] and after["steps"] == 5
    assert RunFolder(tmp_path).tokenizer.read_bytes() == tokenizer  # the resumed run kept its own tokenizer


def test_a_lora_recipe_repeats_exactly(task_data, chat_data, base_run, tmp_path):
    """The adapters' random start comes from the recipe's seed, not from whatever the process drew before."""
    module, values = tiny_recipes(task_data, chat_data, base_run)["chat"]
    losses = []
    for attempt in range(2):
        torch.manual_seed(attempt)  # a different global random state before each run
        recipe = from_dict(module.TASK.Recipe, {**values, "train": TWO_STEPS, "device": "cpu"})
        run_task(module.TASK, recipe, tmp_path / str(attempt), progress=False)
        records = RunFolder(tmp_path / str(attempt)).read_metrics_log()
        losses.append([record["loss"] for record in records if "loss" in record])
    assert losses[0] == losses[1]


def one_line_corpus(path, characters: int = 4000):
    """A .txt corpus of one long line: one record, so the hash split puts all of it in the training split."""
    rng = random.Random(5)
    line = "".join(rng.choice(FILLER) for _ in range(characters))
    assert split_of(line, 0.01, 0.01) == "train"
    path.write_text(line + "\n", encoding="utf-8")
    return path


def test_a_corpus_of_one_record_says_it_all_fell_in_the_training_split(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    corpus = one_line_corpus(tmp_path / "one-line.txt")
    recipe = from_dict(
        causal_lm.PretrainRecipe,
        {"data": {"source": str(corpus), "vocab_size": 300, "context": 16}, "model": TINY_DECODER,
         "train": TWO_STEPS, "device": "cpu"},
    )  # fmt: skip
    with pytest.raises(UserError) as caught:
        run_task(causal_lm.TASK, recipe, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert f"all 1 records of {corpus} fell in the training split" in message
    assert "more lines" in message and "valid_fraction" in message
    assert "too small" not in message  # thousands of tokens: size was never the problem


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_was(task_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    values = {"data": {"source": str(one_line_corpus(tmp_path / "one-line.txt")), "vocab_size": 300, "context": 16},
              "model": TINY_DECODER, "train": TWO_STEPS, "device": "cpu"}  # fmt: skip
    # Bad data: a new folder (and its new parent) is removed, an existing one keeps exactly what it held.
    with pytest.raises(UserError, match="all 1 records"):
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, values), tmp_path / "new" / "run", progress=False)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    (existing / "notes" / "mine.txt").write_text("keep me")
    (existing / RunFolder.RECIPE).write_text('{"mine": true}')
    with pytest.raises(UserError, match="all 1 records"):
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, values), existing, progress=False)
    left = {p.relative_to(existing).as_posix() for p in existing.rglob("*")}
    assert left == {RunFolder.RECIPE, "notes", "notes/mine.txt"}

    # A failure in training, after the tokenizer, recipe and first validation were written: all of it goes, and
    # the recipe.json the folder held before comes back.
    good = {**values, "data": {**values["data"], "source": str(task_data / "text.jsonl"), "valid_fraction": 0.1}}
    real_train = base.train

    def train_then_fail(model, objective, batch_for, config, run_dir, *args, **kwargs):
        RunFolder(run_dir).read_recipe()  # written by now
        (RunFolder(run_dir).path / RunFolder.METRICS_LOG).write_text('{"step": 0}\n')
        raise RuntimeError("out of memory")

    monkeypatch.setattr(base, "train", train_then_fail)
    with pytest.raises(RuntimeError):
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, good), existing, progress=False)
    assert (existing / RunFolder.RECIPE).read_text() == '{"mine": true}'
    assert not (existing / RunFolder.TOKENIZER).exists() and not (existing / RunFolder.METRICS_LOG).exists()

    # Once a checkpoint exists the run is resumable, and a later failure keeps every file for --resume.
    def fail_after_a_checkpoint(*args, **kwargs):
        real_train(*args, **kwargs)
        raise RuntimeError("the disk filled up while plotting")

    monkeypatch.setattr(base, "train", fail_after_a_checkpoint)
    with pytest.raises(RuntimeError):
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, good), existing, progress=False)
    assert (existing / RunFolder.TOKENIZER).is_file() and any((existing / RunFolder.CHECKPOINTS).iterdir())

    # Resuming from that checkpoint copies nothing aside (the folder may hold gigabytes) and keeps every file.
    monkeypatch.setattr(base, "FolderState", None)  # a snapshot would now raise a TypeError
    with pytest.raises(RuntimeError, match="disk filled up"):
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, good), existing, resume=True, progress=False)
    assert (existing / RunFolder.TOKENIZER).is_file() and any((existing / RunFolder.CHECKPOINTS).iterdir())


@pytest.fixture
def bayes_calls(tmp_path, monkeypatch):
    """A private baseline cache, and how often snownlp's Bayes is trained and asked to classify."""
    from snownlp.sentiment import Sentiment

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    calls = {"train": 0, "classify": 0}
    train, classify = Sentiment.train, Sentiment.classify

    def counted_train(self, *args):
        calls["train"] += 1
        return train(self, *args)

    def counted_classify(self, text):
        calls["classify"] += 1
        return classify(self, text)

    monkeypatch.setattr(Sentiment, "train", counted_train)
    monkeypatch.setattr(Sentiment, "classify", counted_classify)
    return calls


def test_the_retrained_bayes_baseline_is_cached_per_training_split(sentiment_data, tmp_path, bayes_calls):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sentiment_data, data)
    recipe = from_dict(
        sentiment.Recipe,
        {"data": {"source": str(data)}, "vocab_size": 300, "model": tiny_encoder("classify"), "max_length": 24,
         "train": {**TINY_TRAIN, "max_steps": 2}, "device": "cpu"},
    )  # fmt: skip
    first = run_task(sentiment.TASK, recipe, tmp_path / "run", progress=False)
    assert bayes_calls["train"] == 1 and bayes_calls["classify"] > 0
    assert "from the cache" not in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")

    # The same splits again: neither retrained nor asked again, and the same numbers.
    bayes_calls["classify"] = 0
    again = sentiment.evaluate_run(tmp_path / "run", TaskData(source=str(data)), "test", tmp_path / "again")
    assert bayes_calls == {"train": 1, "classify": 0}
    assert again["baselines"] == first["baselines"]
    report = (tmp_path / "again" / "report.md").read_text(encoding="utf-8")
    assert "retrained: from the cache" in report and "--baselines none" in report

    # Another split to score: the trained classifier comes from the cache, only its predictions are new.
    sentiment.evaluate_run(tmp_path / "run", TaskData(source=str(data)), "valid", tmp_path / "valid", None, False)
    assert bayes_calls["train"] == 1 and bayes_calls["classify"] > 0

    # A changed training split is a different classifier: retrained.
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    sentiment.evaluate_run(tmp_path / "run", TaskData(source=str(data)), "test", tmp_path / "changed", None, False)
    assert bayes_calls["train"] == 2


def test_baselines_none_skips_them_and_the_report_says_so(sentiment_data, tmp_path, bayes_calls):
    recipe = from_dict(
        sentiment.Recipe,
        {"data": {"source": str(sentiment_data)}, "vocab_size": 300, "model": tiny_encoder("classify"),
         "max_length": 24, "train": {**TINY_TRAIN, "max_steps": 1}, "device": "cpu", "baselines": "none"},
    )  # fmt: skip
    metrics = run_task(sentiment.TASK, recipe, tmp_path / "run", progress=False)
    assert metrics["baselines"] == {} and metrics["baselines_skipped"] is True
    assert bayes_calls == {"train": 0, "classify": 0}
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "Baselines were skipped" in report and "majority class" not in report
    with pytest.raises(UserError, match="baselines must be one of all, none"):
        sentiment.evaluate_run(tmp_path / "run", TaskData(source=str(sentiment_data)), baselines="some")


def test_pretraining_with_a_mixed_corpus_learns_its_words_and_validates_on_the_main_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    news, reviews = tmp_path / "news.txt", tmp_path / "reviews.txt"
    news.write_text("\n".join(f"第{i}段：人民日报社论，新年快乐。" for i in range(400)), encoding="utf-8")
    reviews.write_text("\n".join(f"这家酒店房间干净，服务热情，第{i}次入住。" for i in range(400)), encoding="utf-8")
    data = {"source": str(news), "vocab_size": 500, "context": 16, "valid_fraction": 0.1, "test_fraction": 0.1}

    def pretrain(name, **mix):
        values = {"data": {**data, **mix}, "model": TINY_DECODER, "train": TWO_STEPS, "device": "cpu"}
        run_task(causal_lm.TASK, from_dict(causal_lm.PretrainRecipe, values), tmp_path / name, progress=False)
        return Tokenizer.load(tmp_path / name)

    mixed, alone = pretrain("mixed", mix=str(reviews), mix_share=0.5), pretrain("alone")
    assert len(mixed.encode("酒店房间干净")) < len(alone.encode("酒店房间干净"))  # the tokenizer learnt both corpora
    train, valid = causal_lm.training_windows(str(news), mixed, 16, (0.1, 0.1), 0, False, (str(reviews), 0.5))
    inputs, _ = train.training_batch(0, 8)
    texts = [mixed.decode(row.tolist()) for row in inputs]
    assert sum("酒店" in text for text in texts) == 4 and sum("人民日报" in text for text in texts) == 4
    assert "酒店" not in mixed.decode(valid.tokens[:].tolist())  # validation: the main corpus alone
    with pytest.raises(UserError, match="mix_share"):
        from_dict(causal_lm.PretrainRecipe, {"data": {**data, "mix": str(reviews)}})
