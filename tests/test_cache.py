"""The KV cache's row operations: merging, dropping and trimming rows give the logits a fresh cache gives."""

import torch

from lmforge.generate.engine import left_pad
from lmforge.models.decoder import Decoder, DecoderConfig

PROMPTS = [[1, 7, 9], [1, 3, 4, 5, 6, 8, 2, 11], [1, 20], [4, 5, 6, 7, 8]]


def decoder() -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    return Decoder(config).eval()


def prefill(model: Decoder, prompts: list[list[int]], room: int = 8):
    """A cache holding the prompts (left-padded, right-aligned) and each row's next-token logits (B, V)."""
    input_ids, attention_mask = left_pad(prompts, 0, "cpu")
    cache = model.new_cache(len(prompts), input_ids.shape[1] + room)
    cache.pad_left([len(prompt) for prompt in prompts])
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]
    return cache, logits


def step(model: Decoder, cache, tokens: list[int]) -> torch.Tensor:
    """Feed one token per row; the next logits (B, V)."""
    tokens = torch.tensor(tokens)[:, None]
    return model(tokens, attention_mask=cache.attention_mask(new_tokens=1), cache=cache)[:, -1]


def fresh(model: Decoder, sequences: list[list[int]]) -> torch.Tensor:
    """The next-token logits of each whole sequence, from a fresh cache."""
    return prefill(model, sequences)[1]


@torch.inference_mode()
def test_merged_rows_decode_as_in_a_fresh_cache():
    model = decoder()
    first, _ = prefill(model, PROMPTS[:2])
    step(model, first, [5, 6])  # the old rows are one token ahead of their prompts
    second, _ = prefill(model, PROMPTS[2:])
    merged = first.merge(second, max_length=first.length + 8)
    assert merged.batch_size == 4 and merged.length == max(first.length, second.length)
    logits = step(model, merged, [9, 9, 9, 9])
    expected = fresh(model, [PROMPTS[0] + [5, 9], PROMPTS[1] + [6, 9], PROMPTS[2] + [9], PROMPTS[3] + [9]])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_dropping_the_longest_row_trims_its_padding_and_keeps_the_others_exact():
    model = decoder()
    cache, _ = prefill(model, PROMPTS)
    padded = cache.length
    cache.drop([1])  # the 8-token prompt: every other row had at least 3 columns of padding
    assert cache.length == padded - 3 and int(cache.starts.min()) == 0
    logits = step(model, cache, [2, 3, 4])
    expected = fresh(model, [PROMPTS[0] + [2], PROMPTS[2] + [3], PROMPTS[3] + [4]])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_trim_is_a_no_op_when_one_row_has_no_padding():
    model = decoder()
    cache, _ = prefill(model, PROMPTS)
    keys = cache.keys.clone()
    cache.trim()
    assert cache.length == max(len(prompt) for prompt in PROMPTS) and torch.equal(cache.keys, keys)


@torch.inference_mode()
def test_attention_mask_follows_each_rows_padding():
    model = decoder()
    cache, _ = prefill(model, [[1, 2, 3], [4]])
    assert cache.attention_mask(new_tokens=1).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert cache.token_counts().tolist() == [3, 1]
    same_length, _ = prefill(model, [[1, 2], [3, 4]])
    assert same_length.attention_mask(new_tokens=1) is None  # no padding: SDPA's fast path


@torch.inference_mode()
def test_a_static_copy_and_back_keeps_rows_and_padding():
    model = decoder()
    cache, _ = prefill(model, PROMPTS[:3])
    static = cache.static(max_length=32)
    assert static.max_length == 32 and static.position_ids[:, 0].tolist() == [3, 8, 2]
    assert static.key_mask[:, : cache.length + 1].sum(dim=1).tolist() == [4, 9, 3]  # prompt + the next token
    back = static.dynamic(max_length=24)
    assert back.length == cache.length and torch.equal(back.starts, cache.starts)
    torch.testing.assert_close(back.keys[:, :, :, : back.length], cache.keys[:, :, :, : cache.length])
