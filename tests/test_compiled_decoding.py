"""Compiled decoding (`generate --compile`): the same logits and tokens as eager decoding."""

import pytest
import torch

from lmforge.compress.quantize import quantize_model
from lmforge.errors import UserError
from lmforge.generate.compiled import CompiledDecoding, static_length
from lmforge.generate.engine import generate_ids, left_pad
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import LM
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig

PROMPTS = [[1, 7, 9], [1, 3, 4, 5, 6, 8, 2, 11], [1, 20]]


def decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    settings = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_position_embeddings=48, qkv_bias=True, initializer_range=0.2,
    )  # fmt: skip
    return Decoder(DecoderConfig(**{**settings, **overrides})).eval()


@torch.inference_mode()
def test_each_compiled_step_gives_the_eager_logits_on_a_left_padded_batch():
    model = decoder()
    input_ids, attention_mask = left_pad(PROMPTS, 0, "cpu")
    eager_cache = model.new_cache(len(PROMPTS), 48)
    prefill_cache = model.new_cache(len(PROMPTS), 48)
    prefill_cache.pad_left([len(prompt) for prompt in PROMPTS])
    eager = model(input_ids, attention_mask=attention_mask, cache=eager_cache, last_only=True)[:, -1]
    model(input_ids, attention_mask=attention_mask, cache=prefill_cache, last_only=True)
    step = CompiledDecoding(model, prefill_cache, needed=48)
    for _ in range(10):
        tokens = eager.argmax(dim=-1)
        compiled = step(tokens)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(PROMPTS), 1)], dim=1)
        eager = model(tokens[:, None], attention_mask=attention_mask, cache=eager_cache)[:, -1]
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compiled_generation_gives_the_eager_tokens_batched_and_alone():
    model = decoder()
    greedy = SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.3)
    eager = generate_ids(model, PROMPTS, greedy, pad_id=0)
    assert [row.token_ids for row in generate_ids(model, PROMPTS, greedy, pad_id=0, compiled=True)] == [
        row.token_ids for row in eager
    ]
    assert generate_ids(model, PROMPTS[1:2], greedy, compiled=True)[0].token_ids == eager[1].token_ids
    stop = eager[0].token_ids[5]
    stopped = generate_ids(model, PROMPTS[:1], greedy, stop_ids=[stop], compiled=True)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == eager[0].token_ids[: eager[0].token_ids.index(stop)]


def test_two_models_of_one_shape_each_decode_with_their_own_weights():
    # Compiled graphs freeze the weights and are cached per model: another model must not reuse them.
    greedy = SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    first, second = decoder(), decoder()
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.mul_(-1.5)
    for model in (first, second):
        eager = generate_ids(model, PROMPTS[:1], greedy)[0].token_ids
        assert generate_ids(model, PROMPTS[:1], greedy, compiled=True)[0].token_ids == eager
    assert (
        generate_ids(first, PROMPTS[:1], greedy)[0].token_ids != generate_ids(second, PROMPTS[:1], greedy)[0].token_ids
    )


def test_compiled_generation_of_an_int8_model_gives_its_eager_tokens():
    model = decoder()
    quantize_model(model, "int8")
    greedy = SamplingConfig(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    eager = generate_ids(model, PROMPTS[:1], greedy)[0].token_ids
    assert generate_ids(model, PROMPTS[:1], greedy, compiled=True)[0].token_ids == eager


def test_a_model_that_cannot_be_compiled_is_a_clear_error():
    model = decoder()
    quantize_model(model, "int8-dynamic")  # fbgemm's packed weights are opaque to the compiler
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    with pytest.raises(UserError, match="cannot be compiled.*without --compile"):
        generate_ids(model, PROMPTS[:1], greedy, compiled=True)


def test_cache_lengths_round_up_to_a_few_sizes_within_the_context():
    model = decoder(max_position_embeddings=1000)
    assert [static_length(model, needed) for needed in (1, 256, 257, 700, 999)] == [256, 256, 512, 768, 1000]


def test_compiled_decoding_needs_a_decoder():
    encoder = Encoder(EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64))
    with pytest.raises(UserError, match="compiled decoding needs a decoder"):
        LM(encoder, tokenizer=None, compiled=True)
