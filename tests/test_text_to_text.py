"""Translation and summarization end to end on tiny synthetic data sets, plus the shared batching and errors."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch

from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.metrics import rouge
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import read_json, read_jsonl
from lmforge.tasks import summarize, translate
from lmforge.tasks.base import run_task
from lmforge.tasks.encoding import encode_single
from lmforge.tasks.examples import TaskData
from lmforge.tasks.text_to_text import Scoring, collate, encode_targets, evaluate_text_to_text, text_pairs
from lmforge.train.objectives import seq2seq_loss
from lmforge.train.trainer import TrainConfig

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS = dict(zip("一二三四五六七八九", WORDS))
TINY_MODEL = Seq2SeqConfig(
    hidden_size=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_heads=2,
    intermediate_size=128,
    max_position_embeddings=48,
    dropout=0.0,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_splits(folder, rows_by_split: dict[str, list[dict]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def digit_pairs(count: int, seed: int) -> list[dict]:
    """ "三一四" -> "three one four": a word-for-word, in-order translation a tiny model learns in seconds."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        characters = rng.choices(list(DIGITS), k=rng.randint(2, 5))
        rows.append({"src": "".join(characters), "tgt": " ".join(DIGITS[c] for c in characters)})
    return rows


def headline_pairs(count: int, seed: int) -> list[dict]:
    """A two-sentence document whose summary is its first four characters."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        first = "".join(rng.choices("天地人山水火木金土日月", k=rng.randint(6, 10)))
        second = "".join(rng.choices("春夏秋冬东南西北", k=rng.randint(6, 10)))
        rows.append({"document": f"{first}。{second}！", "summary": first[:4]})
    return rows


def tiny_train(steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=20, eval_every=0, save_every=steps)


def training_losses(run) -> list[float]:
    return [record["loss"] for record in read_jsonl(run / "metrics.jsonl") if "loss" in record]


def test_translate_learns_digits_and_beats_copying_the_source(tmp_path):
    data = write_splits(
        tmp_path / "data",
        {"train": digit_pairs(300, 0), "valid": digit_pairs(20, 1), "test": digit_pairs(30, 2)},
    )
    recipe = translate.Recipe(
        data=TaskData(source=data),
        vocab_size=300,
        model=TINY_MODEL,
        max_source_length=16,
        max_target_length=24,
        num_beams=2,
        valid_examples=10,
        train=tiny_train(300),
        device="cpu",
    )
    run = tmp_path / "run"
    metrics = run_task(translate.TASK, recipe, run, progress=False)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "task.json", "recipe.json", "report.md"):
        assert (run / name).is_file(), name
    task = read_json(run / "task.json")
    assert (task["task"], task["direction"], task["source_field"], task["target_field"]) == (
        "translate",
        "zh-en",
        "src",
        "tgt",
    )
    saved = read_json(run / "metrics.json")
    assert {"bleu", "chrf", "greedy", "beam", "baselines"} <= set(saved)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "copy the source" in report and "beam search (2)" in report
    losses = training_losses(run)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    copy = metrics["baselines"]["copy the source"]
    assert metrics["bleu"] > copy["bleu"] + 30 and metrics["chrf"] > copy["chrf"] + 30
    # sacrebleu's paired bootstrap against each baseline: the same corpus scores, a clear difference.
    test = copy["difference"]["bleu"]
    assert test["ours"] == pytest.approx(metrics["bleu"]) and test["theirs"] == pytest.approx(copy["bleu"])
    assert test["p_value"] < 0.01 and "sacrebleu's paired bootstrap" in report

    # --compare: another run of the task as one more baseline (this run itself: equal scores), the wrong task refused.
    compared = translate.evaluate_run(run, TaskData(source=data), out_dir=tmp_path / "eval", progress=False,
                                      compare=run)  # fmt: skip
    itself = compared["baselines"][f"run {run}"]
    # (A model that translates every test sentence perfectly, as on a fast CPU, has intervals of width 0.)
    chrf = itself["difference"]["chrf"]
    assert itself["bleu"] == pytest.approx(compared["bleu"]) and chrf["theirs"] == pytest.approx(chrf["ours"])
    assert chrf["theirs_ci"] == pytest.approx(chrf["ours_ci"]) and chrf["theirs_ci"] >= 0
    shutil.copytree(run, tmp_path / "other")
    (tmp_path / "other" / "task.json").write_text('{"task": "summarize"}')
    with pytest.raises(UserError, match="is a run of 'summarize', not of translate zh-en"):
        translate.evaluate_run(run, TaskData(source=data), out_dir=tmp_path / "eval", progress=False,
                               compare=str(tmp_path / "other"))  # fmt: skip


def test_summarize_trains_and_reports_rouge_beside_lead(tmp_path):
    data = write_splits(
        tmp_path / "data",
        {"train": headline_pairs(200, 0), "valid": headline_pairs(20, 1), "test": headline_pairs(20, 2)},
    )
    recipe = summarize.Recipe(
        data=TaskData(source=data),
        vocab_size=300,
        model=TINY_MODEL,
        max_source_length=32,
        max_target_length=12,
        num_beams=2,
        valid_examples=10,
        train=tiny_train(100),
        lead_pretraining_steps=5,
        no_repeat_ngram_size=2,
        device="cpu",
    )
    run = tmp_path / "run"
    metrics = run_task(summarize.TASK, recipe, run, progress=False)

    assert (run / "model.safetensors").is_file() and (run / "loss.png").is_file()
    # The lead-bias phase ran first, in its own folder, for its own number of steps.
    assert [r["step"] for r in read_jsonl(run / "warm-up" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    assert {"rouge1", "rouge2", "rougeL"} <= set(metrics) and {"rouge1", "rouge2", "rougeL"} <= set(metrics["greedy"])
    assert "lead" in metrics["baselines"] and "lead" in (run / "report.md").read_text(encoding="utf-8")
    # The model's paired difference from the lead, per metric, with its bootstrap interval.
    for key in ("rouge1", "rouge2", "rougeL"):
        difference = metrics["baselines"]["lead"]["difference"][key]
        assert difference["mean"] == pytest.approx(metrics["beam"][key] - metrics["baselines"]["lead"][key])
        assert difference["low"] <= difference["mean"] <= difference["high"]
    assert "minus baseline 'lead'" in (run / "report.md").read_text(encoding="utf-8")
    losses = training_losses(run)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    # Evaluation alone, with a decoding override.
    greedy_only = summarize.evaluate_run(
        run, TaskData(source=data), "valid", tmp_path / "eval", progress=False, num_beams=1
    )
    assert greedy_only["decoding"]["num_beams"] == 1 and "beam" not in greedy_only
    assert greedy_only["decoding"]["no_repeat_ngram_size"] == 2  # from the run's task.json
    assert greedy_only["decoding"]["mbr_samples"] == 0 and "mbr" not in greedy_only

    # Minimum Bayes risk decoding: reported last, so its scores are the headline and the lead difference's.
    mbr = summarize.evaluate_run(run, TaskData(source=data), "valid", tmp_path / "mbr", progress=False, mbr_samples=6)
    assert mbr["decoding"]["mbr_samples"] == 6 and mbr["decoding"]["mbr_temperature"] == 0.7
    assert {"greedy", "beam", "mbr"} <= set(mbr)
    assert {key: mbr[key] for key in ("rouge1", "rouge2", "rougeL")} == mbr["mbr"]
    difference = mbr["baselines"]["lead"]["difference"]["rougeL"]["mean"]
    assert difference == pytest.approx(mbr["mbr"]["rougeL"] - mbr["baselines"]["lead"]["rougeL"])
    report = (tmp_path / "mbr" / "report.md").read_text(encoding="utf-8")
    assert "MBR over 6 samples (temperature 0.7) minus baseline 'lead'" in report
    again = summarize.evaluate_run(run, TaskData(source=data), "valid", tmp_path / "2", progress=False, mbr_samples=6)
    assert again["mbr"] == mbr["mbr"]  # sampling is seeded: the same split decodes the same way
    with pytest.raises(UserError, match="no utility for minimum Bayes risk"):
        evaluate_text_to_text(
            "summarize", run, TaskData(source=data), "valid", tmp_path / "none",
            Scoring(score=rouge, columns=[], baselines={}, notes=[]), progress=False, mbr_samples=2,
        )  # fmt: skip


def test_lead_bias_pairs_predict_the_lead_from_the_rest():
    documents = [
        "今天下雨了。明天晴，后天多云，大后天下雪。",
        "只有一句话而已没有后文。",
        "短。后面的内容足够长了吗是的",
    ]
    sources, targets = summarize.lead_bias_pairs(documents)
    assert sources == ["明天晴，后天多云，大后天下雪。"] and targets == ["今天下雨了。"]


def test_lead_is_the_first_sentence_cut_to_30_characters():
    assert summarize.lead("今天下雨了。明天晴！") == "今天下雨了。"
    assert summarize.lead("没有句号的一句话") == "没有句号的一句话"
    assert summarize.lead("长" * 50 + "。") == "长" * 30


def test_en_zh_swaps_the_fields():
    task = translate.task_info("en-zh")
    assert (task["source_field"], task["target_field"], task["target_lang"]) == ("tgt", "src", "zh")


@pytest.mark.parametrize(
    ("task", "rows", "field"),
    [
        (translate, [{"src": "一", "tgt": "one"}, {"src": "二", "tgt": "two"}, {"src": "三"}], "tgt"),
        (summarize, [{"document": "天地。", "summary": "天"}, {"summary": "地"}], "document"),
        (translate, [{"src": "一", "tgt": "one"}, {"src": "二", "tgt": ""}], "tgt"),
        (summarize, [{"document": "天地。", "summary": "   "}], "summary"),
    ],
)
def test_a_missing_or_empty_field_is_named(tmp_path, task, rows, field):
    data = write_splits(tmp_path / "data", {"train": rows, "valid": rows, "test": rows})
    recipe = task.Recipe(data=TaskData(source=data), device="cpu")
    with pytest.raises(UserError, match=f"field '{field}'") as error:
        run_task(task.TASK, recipe, tmp_path / "run", progress=False)
    if not rows[-1].get(field, "x").isspace():
        assert f"record {len(rows)}" in str(error.value)


def test_collate_pads_on_the_right_and_ignores_padding_in_labels(tmp_path):
    data = write_splits(tmp_path / "data", {"train": digit_pairs(50, 0)})
    sources, targets = text_pairs(TaskData(source=data), "train", "src", "tgt")
    tokenizer = Tokenizer.train(sources + targets, 300, show_progress=False)
    source_rows = [[tokenizer.bos_id, 10, tokenizer.eos_id], [tokenizer.bos_id, 10, 11, 12, tokenizer.eos_id]]
    target_rows = encode_targets(tokenizer, ["one two three four", "one"], max_target_length=4)
    assert len(target_rows[0]) == 3  # cut to leave room for <bos> / <eos>
    batch = collate(tokenizer, list(zip(source_rows, target_rows)))

    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == batch["decoder_attention_mask"].shape
    assert batch["decoder_input_ids"].shape == (2, 4)
    assert batch["decoder_input_ids"][:, 0].tolist() == [tokenizer.bos_id] * 2
    short = len(target_rows[1])
    assert batch["labels"][1, : short + 1].tolist() == [*target_rows[1], tokenizer.eos_id]
    assert batch["labels"][1, short + 1 :].eq(IGNORE_INDEX).all()
    assert batch["labels"][0].ne(IGNORE_INDEX).all()
    # Shifted by one: the decoder sees token t and predicts token t + 1.
    assert torch.equal(batch["decoder_input_ids"][0, 1:], batch["labels"][0, :-1])


def test_label_smoothing_spreads_a_share_over_the_copy_models_probabilities(tmp_path):
    data = write_splits(tmp_path / "data", {"train": headline_pairs(20, 0)})
    sources, targets = text_pairs(TaskData(source=data), "train", "document", "summary")
    tokenizer = Tokenizer.train(sources + targets, 300, show_progress=False)
    source_rows = encode_single(tokenizer, sources[:3], 24)
    batch = collate(tokenizer, list(zip(source_rows, encode_targets(tokenizer, ["天地", "天地人山", "水"], 8))))
    torch.manual_seed(0)
    model = Seq2Seq(dataclasses.replace(TINY_MODEL, vocab_size=tokenizer.vocab_size, copy=True)).eval()

    plain, tokens = seq2seq_loss(model, batch)
    smoothed, _ = seq2seq_loss(model, batch, label_smoothing=0.1)

    log_probs = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, vocab)
    real = batch["labels"] != IGNORE_INDEX
    target_log_probs = log_probs.gather(-1, batch["labels"].clamp_min(0)[..., None])[..., 0]
    nll = -target_log_probs[real].mean()
    uniform = -log_probs[real].mean()  # cross-entropy against the uniform distribution, per token
    assert tokens == int(real.sum())
    assert plain.item() == pytest.approx(nll.item(), rel=1e-5)
    assert smoothed.item() == pytest.approx((0.9 * nll + 0.1 * uniform).item(), rel=1e-5)
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        summarize.Recipe(label_smoothing=1.0)


@pytest.mark.parametrize("changes", [{"mbr_samples": -1}, {"mbr_temperature": 0.0}])
def test_mbr_settings_are_checked(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        translate.Recipe(**changes)
