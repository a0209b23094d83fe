"""Constrained decoding: every sampled output has the exact poem form, under any sampling settings."""


import pytest
import torch

from lmforge.data.poetry import FORMS, form_named, form_of, line_ends, rhyme_group, rhymes, split_poem
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate.constraints import TemplateConstraint, TokenTable
from lmforge.lm import LM
from lmforge.models.decoder import Decoder, DecoderConfig

POEMS = [
    "静夜思 李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "登鹳雀楼 王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    "春晓 孟浩然\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "早发白帝城 李白\n朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。",
]


@pytest.fixture(scope="module")
def lm() -> LM:
    tokenizer = Tokenizer.train(POEMS * 20, 420, show_progress=False)
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    return LM(Decoder(config), tokenizer)


def test_forms_are_read_from_the_corpus_layout():
    title, body = split_poem(POEMS[0])
    assert title == "静夜思" and form_of(body) == FORMS["五言绝句"]
    assert form_of(split_poem(POEMS[3])[1]) == FORMS["七言绝句"]
    assert form_of("床前明月光，疑是地上霜。") is None  # two lines: no regulated form
    assert form_of("床前明月光，疑是霜。\n举头望明月，低头思故乡。") is None
    assert line_ends(body) == ["光", "霜", "月", "乡"]
    assert form_named("7-regulated") == FORMS["七言律诗"]
    with pytest.raises(UserError, match="unknown poem form '六言'; known forms: 五言绝句"):
        form_named("六言")


def test_rhyme_groups_drop_the_medial():
    assert rhyme_group("光") == rhyme_group("霜") == rhyme_group("乡") == "ang"
    assert rhyme_group("流") == rhyme_group("楼") == "ou"
    assert (
        rhyme_group("山") == rhyme_group("间") == rhyme_group("关") == "an"
    )  # 还 reads hai alone: polyphones take their first reading
    assert rhymes(split_poem(POEMS[0])[1]) and rhymes(split_poem(POEMS[1])[1])
    assert rhymes("白日依山尽，黄河入海流。\n欲穷千里目，更上一层山。") is False


@pytest.mark.parametrize(
    "form,settings",
    [
        ("五言绝句", {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}),
        ("五言绝句", {"temperature": 1.3, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.5}),
        ("七言律诗", {"temperature": 1.0, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.3}),
        ("七言绝句", {"temperature": 0.0, "repetition_penalty": 1.2}),
    ],
)
def test_every_sampled_output_has_the_exact_form(lm, form, settings):
    constraint = lm.form_constraint(form)
    outputs = lm.generate(["题目：春夜\n正文：\n"] * 8, constraint=constraint, max_new_tokens=80, seed=3, **settings)
    for output in outputs:
        assert form_of(output) == FORMS[form], output
    free = lm.generate(["题目：春夜\n正文：\n"] * 8, max_new_tokens=30, seed=3, **settings)
    assert sum(form_of(output) is not None for output in free) < len(free)  # the random model alone has no form


def test_streaming_and_rhyme(lm):
    constraint = lm.form_constraint("五言绝句", rhyme=True)
    text = "".join(lm.generate("春", stream=True, constraint=constraint, max_new_tokens=40, seed=1, temperature=1.0))
    assert form_of(text) == FORMS["五言绝句"]
    outputs = lm.generate(["春"] * 16, constraint=constraint, max_new_tokens=40, seed=2, temperature=1.0, top_k=0)
    assert all(form_of(output) for output in outputs)
    assert sum(bool(rhymes(output)) for output in outputs) >= 14  # the rhyme gives way only when no token rhymes


def test_impossible_constraints_are_clear_errors(lm):
    with pytest.raises(UserError, match="needs up to 26 new tokens .* max_new_tokens is 10"):
        lm.generate("春", constraint=lm.form_constraint("五言绝句"), max_new_tokens=10)
    table = TokenTable([b"a", b"b", "春".encode()])
    with pytest.raises(UserError, match="no token for '，'"):
        TemplateConstraint(table, [None, "，"], end_id=0)
