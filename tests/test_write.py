"""Write task: poems and prose read with their controls, loss on the text only, the report's forms and baselines."""

import json

import numpy as np
import pytest
import torch

from lmforge.config import from_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks import write
from lmforge.tasks.base import run_task
from lmforge.tasks.examples import TaskData

CHARACTERS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水长江流日夜白云千里"


def poem(rng, length: int, lines: int) -> str:
    rows = []
    for _ in range(lines // 2):
        halves = ["".join(rng.choice(list(CHARACTERS), length)) for _ in range(2)]
        rows.append(f"{halves[0]}，{halves[1]}。")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("write")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("valid", 6), ("test", 6)):
        rows = []
        for number in range(count):
            length, lines = ((5, 4), (7, 4), (5, 8))[number % 3] if split == "train" else (5 + 2 * (number % 2), 4)
            text = f"春日{number} 李白\n{poem(rng, length, lines)}"
            rows.append({"text": text, "source": write.POEM_SOURCE})
        rows.append({"text": "法律条文第一条 总则", "source": "LawRefBook/宪法"})  # not a poem: left out
        rows.append({"title": "春天来了", "text": "今天天气很好，春天来了，花开了。" * 2})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("base")
    texts = [json.loads(line).get("text", "") for line in (corpus / "train.jsonl").read_text().splitlines()]
    texts += ["题目：体裁：五言绝句七言绝句五言律诗正文：标题：文体：现代字数：约字"] * 5
    tokenizer = Tokenizer.train(texts, 380, show_progress=False)
    tokenizer.save(folder)
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    save_model(folder, Decoder(config))
    return folder


def test_examples_carry_their_controls(corpus):
    examples = write.writing_examples(TaskData(source=str(corpus)), "train")
    poems = [e for e in examples if e["kind"] == "poem"]
    assert len(poems) == 40 and {e["form"] for e in poems} == {"五言绝句", "七言绝句", "五言律诗"}
    assert write.prompt_for(poems[0]) == "题目：春日0\n体裁：五言绝句\n正文：\n"
    [prose] = [e for e in examples if e["kind"] == "prose"]
    assert write.prompt_for(prose) == "标题：春天来了\n文体：现代\n字数：约40字\n正文：\n"


def test_loss_falls_on_the_text_only(base, corpus):
    tokenizer = Tokenizer.load(base)
    example = write.writing_examples(TaskData(source=str(corpus)), "train")[0]
    [(ids, mask)] = write.encode_examples(tokenizer, [example], 128)
    prompt = len(tokenizer.encode(write.prompt_for(example))) + 1
    assert not any(mask[:prompt]) and all(mask[prompt:])
    assert tokenizer.decode(ids[prompt:]) == example["text"]


def test_bad_records_are_clear_errors(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"title": "t", "text": "x", "style": "诗歌"}, ensure_ascii=False))
    with pytest.raises(UserError, match="style '诗歌' .* is not one of 现代, 文言"):
        write.writing_examples(TaskData(source=str(tmp_path)), "test")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "法律", "source": "LawRefBook/x"}, ensure_ascii=False))
    with pytest.raises(UserError, match="no writing example"):
        write.writing_examples(TaskData(source=str(tmp_path)), "test")


def test_form_scores_count_lines_characters_and_rhymes(base):
    five = write.form_named("五言绝句")
    outputs = [
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",  # exact, rhymes (ang)
        "床前明月光，疑是地上霜。\n举头望明月，低头思故人。",  # exact, no rhyme
        "床前明月光，疑是地上霜。\n举头望明月，低头思。",  # four lines, one short
        "床前明月光",  # one line, of the right length
    ]
    scores = write.form_scores(outputs, [five] * 4)
    assert scores == {"form_accuracy": 0.5, "line_count_accuracy": 0.75, "line_length_accuracy": 0.75,
                      "rhyme_rate": 0.25}  # fmt: skip
    texts = write.text_scores(["春春春春春春", "春花秋月"], None)
    assert texts["repeated_4grams"] == pytest.approx(2 / 4) and texts["distinct_1"] == pytest.approx(4 / 10)
    from lmforge.lm import load

    lm = load(base, device="cpu")
    assert write.output_perplexity(lm, ["春花秋月"]) > 1


@pytest.mark.slow
def test_tiny_run_reports_forms_against_the_baselines(tmp_path, base, corpus):
    recipe = from_dict(write.Recipe, {
        "data": {"source": str(corpus), "max_eval_examples": 4}, "base": str(base), "device": "cpu",
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "save_every": 3, "warmup_steps": 1},
        "generation": {"max_new_tokens": 34, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 5},
    })  # fmt: skip
    metrics = run_task(write.TASK, recipe, tmp_path / "run", progress=False)
    assert metrics["form_accuracy"] == 1.0 and metrics["line_length_accuracy"] == 1.0
    baselines = metrics["baselines"]
    assert baselines["random training poem of the same form"]["form_accuracy"] == 1.0
    assert baselines["prompt copied"]["form_accuracy"] == 0.0
    assert baselines["model without constraint"]["form_accuracy"] < 1.0
    assert "rougeL" in baselines["prompt copied"] and metrics["sampling"]["seed"] == 5
    assert metrics["base_perplexity"] > 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert "random training poem of the same form" in report and "春日" in report  # the gallery's titles


def test_peoples_daily_paragraphs_are_prose_written_from_their_opening():
    paragraph = {"text": "新华社北京１月１日电。今天，首都各界人士欢聚一堂，共同庆祝新年的到来，会场气氛热烈。"}
    example = write.opening_example(paragraph)
    assert example["title"] == "新华社北京１月１日电。" and example["text"].startswith("今天，首都")
    assert write.prompt_for(example) == "开头：新华社北京１月１日电。\n文体：现代\n字数：约40字\n正文：\n"
    assert write.opening_example({"text": "短短一句。后面也短。"}) is None  # too little left to write
    headline = {"kind": "prose", "title": "新年", "style": "现代", "text": "今" * 95}
    assert write.prompt_for(headline) == "标题：新年\n文体：现代\n字数：约100字\n正文：\n"


def test_peoples_daily_adds_as_many_training_texts_as_asked_and_keeps_its_splits_apart(corpus):
    data = TaskData(source=str(corpus))
    train = [e for e in write.writing_examples(data, "train", peoples_daily=50) if e.get("opening")]
    test = [e for e in write.writing_examples(data, "test", peoples_daily=50) if e.get("opening")]
    assert len(train) == 50 and len(test) > 50  # the cap is for training; every held-out paragraph is scored
    assert not {e["title"] + e["text"] for e in train} & {e["title"] + e["text"] for e in test}


def test_length_error_is_the_relative_distance_to_the_length_asked():
    references = ["字" * 100, "字" * 41]  # asked: about 100 and about 40 characters
    assert write.length_error(["字" * 100, "字" * 40], references) == 0
    assert write.length_error(["字" * 50, " " + "字" * 60 + "\n"], references) == pytest.approx((0.5 + 0.5) / 2)
