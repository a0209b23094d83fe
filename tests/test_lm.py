"""The text edge of generation: streaming never splits a character, stop strings cut cleanly, batches match."""

import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate.text import split_at_stop
from lmforge.lm import LM
from lmforge.models.decoder import Decoder, DecoderConfig

TEXT = "你好，世界！🎉 lmforge 天气很好。👩‍👩‍👧 结束"


class ScriptedModel(Decoder):
    """Emits a fixed token sequence whatever the input, so text-edge behaviour is exactly predictable."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        config = DecoderConfig(
            vocab_size=vocab_size, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
            max_position_embeddings=256,
        )  # fmt: skip
        super().__init__(config)
        self.script = script
        self.position = 0

    def new_cache(self, batch_size, max_length):
        self.position = 0
        return super().new_cache(batch_size, max_length)

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False):
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e9)
        logits[..., self.script[min(self.position, len(self.script) - 1)]] = 0.0
        self.position += 1
        return logits


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # Few merges: emoji and most Chinese characters are split over several byte tokens.
    return Tokenizer.train(["lmforge 你好 天气"] * 20, vocab_size=280, show_progress=False)


def scripted_lm(tokenizer, text=TEXT, end_with_eos=True) -> LM:
    script = tokenizer.encode(text) + ([tokenizer.eos_id] if end_with_eos else [])
    return LM(ScriptedModel(script, tokenizer.vocab_size), tokenizer)


def test_streamed_pieces_are_whole_characters_and_join_to_the_full_text(tokenizer):
    assert len(tokenizer.encode(TEXT)) > len(TEXT)  # some characters really span several tokens
    lm = scripted_lm(tokenizer)
    pieces = list(lm.generate("问", stream=True, temperature=0, max_new_tokens=200))
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == TEXT
    assert lm.generate("问", temperature=0, max_new_tokens=200) == TEXT


def test_stop_string_cuts_the_text_and_is_never_streamed(tokenizer):
    lm = scripted_lm(tokenizer)
    pieces = list(lm.generate("问", stream=True, stop=["结束"], temperature=0, max_new_tokens=200))
    assert "".join(pieces) == TEXT[: TEXT.index("结束")]
    completion = lm.complete(["问"], stop=["天气"], temperature=0, max_new_tokens=200)[0]
    assert completion.text == TEXT[: TEXT.index("天气")] and completion.finish_reason == "stop"


def test_finish_reason_length_and_stop(tokenizer):
    lm = scripted_lm(tokenizer)
    short = lm.complete(["问"], temperature=0, max_new_tokens=3)[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3
    full = lm.complete(["问"], temperature=0, max_new_tokens=200)[0]
    assert full.finish_reason == "stop" and full.text == TEXT


def test_split_at_stop_holds_back_a_possible_start():
    assert split_at_stop("abc结", ["结束"]) == ("abc", "结", False)
    assert split_at_stop("abc结束def", ["结束"]) == ("abc", "", True)
    assert split_at_stop("abc结", ["结束"], final=True) == ("abc结", "", False)


def test_bad_sampling_values_and_long_prompts_are_user_errors(tokenizer):
    lm = scripted_lm(tokenizer)
    with pytest.raises(UserError, match="top_p"):
        lm.generate("问", top_p=0)
    with pytest.raises(UserError, match="context"):
        lm.generate("你" * 300)
    with pytest.raises(UserError, match="one prompt"):
        lm.generate(["a", "b"], stream=True)
