"""The generation engine: batched greedy decoding equals each row alone; sampling controls behave."""

import pytest
import torch

from lmforge.generate.engine import generate_ids, left_pad
from lmforge.generate.sampling import (
    SamplingConfig,
    candidates,
    filter_top_p,
    next_tokens,
    penalize_repetition,
    prompt_tokens_seen,
)
from lmforge.models.decoder import Decoder, DecoderConfig


def tiny_model() -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return Decoder(config).eval()


def test_batched_greedy_rows_equal_unbatched():
    model = tiny_model()
    prompts = [[1, 7, 9], [1, 3, 4, 5, 6, 8, 2, 11], [1, 20]]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
    batched = generate_ids(model, prompts, greedy, pad_id=0)
    for prompt, row in zip(prompts, batched):
        assert generate_ids(model, [prompt], greedy, pad_id=0)[0].token_ids == row.token_ids
    assert all(len(row.token_ids) == 12 and row.finish_reason == "length" for row in batched)


def test_stop_token_ends_a_row_and_is_not_returned():
    model = tiny_model()
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    free = generate_ids(model, [[1, 2, 3]], greedy)[0].token_ids
    stopped = generate_ids(model, [[1, 2, 3]], greedy, stop_ids=[free[3]])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free[: free.index(free[3])]


def test_generation_stops_at_the_context():
    model = tiny_model()
    result = generate_ids(model, [[1] * 60], SamplingConfig(max_new_tokens=100, temperature=0))[0]
    assert len(result.token_ids) == 4 and result.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model()
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    first = generate_ids(model, [[1, 2]], config)[0].token_ids
    assert generate_ids(model, [[1, 2]], config)[0].token_ids == first
    other = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=4)
    assert generate_ids(model, [[1, 2]], other)[0].token_ids != first


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probabilities, ids = candidates(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=1.0))
    assert ids.tolist() == [[0, 1]] and probabilities[0].tolist() == pytest.approx([0.625, 0.375])
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    assert next_tokens(logits, SamplingConfig(temperature=0, repetition_penalty=2.5), seen).item() == 2


def test_the_repetition_penalty_sees_a_prompts_tokens_but_not_its_padding():
    # Pad id 0 is also a real token of the first prompt: it counts there, and not in the padded second row.
    input_ids, mask = left_pad([[5, 0, 7], [9]], pad_id=0, device="cpu")
    seen = prompt_tokens_seen(input_ids, mask, vocab_size=10)
    assert [row.nonzero().flatten().tolist() for row in seen] == [[0, 5, 7], [9]]
    assert prompt_tokens_seen(input_ids[:1], None, vocab_size=10)[0].nonzero().flatten().tolist() == [0, 5, 7]
