"""The generation engine: batched greedy decoding equals each row alone; sampling controls behave."""

import pytest
import torch

from lmforge.errors import UserError
from lmforge.generate.engine import Engine, Request, generate_ids, left_pad
from lmforge.generate.sampling import (
    SamplingConfig,
    candidates,
    filter_top_p,
    next_tokens,
    next_tokens_per_row,
    penalize_repetition,
    prompt_tokens_seen,
)
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig


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


def test_rows_filtered_together_draw_what_each_draws_alone():
    """Seeded rows share their group's filtering but draw from their own generator: as if each were alone."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    warm = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9)
    hot = SamplingConfig(temperature=1.5, top_k=0, top_p=0.95)
    configs = [warm, warm, hot, warm, hot]
    seeds = [1, 2, 3, None, 4]
    batched = []
    for _ in range(20):  # enough draws that a wrong row, generator or filter would show
        generators = [torch.Generator().manual_seed(seed) if seed else None for seed in seeds]
        alone = [torch.Generator().manual_seed(seed) if seed else None for seed in seeds]
        tokens = next_tokens_per_row(logits, configs, None, generators).tolist()
        for row in (0, 1, 2, 4):
            assert tokens[row] == next_tokens(logits[row : row + 1], configs[row], None, alone[row]).item()
        batched.append(tokens[3])
        seeds = [seed + 10 if seed else None for seed in seeds]
    kept = candidates(logits[3:4], warm)[1][0].tolist()  # an unseeded row still draws from its own candidates
    assert set(batched) <= set(kept)


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


def run_continuously(engine: Engine, arrivals: dict[int, list[Request]], cancel: dict[int, Request] | None = None):
    """Step the engine, adding requests at the steps `arrivals` names; each request's tokens and ending."""
    cancel = cancel or {}
    tokens: dict[int, list[int]] = {}
    endings: dict[int, str] = {}
    step = 0
    while engine.has_work() or any(at >= step for at in arrivals):
        if step in arrivals:
            engine.add(arrivals[step])
        if step in cancel:
            engine.remove([cancel[step]])
        for token in engine.step():
            if token.finish_reason == "stop":
                endings[id(token.request)] = "stop"
                continue
            tokens.setdefault(id(token.request), []).append(token.token_id)
            if token.finish_reason:
                endings[id(token.request)] = token.finish_reason
        step += 1
    return tokens, endings


CONTINUOUS_PROMPTS = [[1, 7, 9], [1, 3, 4, 5, 6, 8, 2, 11], [1, 20], [5, 5, 5, 5], [2]]
CONTINUOUS_BUDGETS = [12, 4, 9, 7, 15]


@pytest.mark.parametrize("compiled", [False, True])
def test_continuous_batching_gives_each_request_the_tokens_it_gets_alone(compiled):
    model = tiny_model()
    configs = [SamplingConfig(max_new_tokens=n, temperature=0, repetition_penalty=1.3) for n in CONTINUOUS_BUDGETS]
    requests = [Request(prompt, config) for prompt, config in zip(CONTINUOUS_PROMPTS, configs)]
    # Compiled steps for at most 2 rows: the batch crosses between compiled and eager steps as rows come and go.
    engine = Engine(model, compiled=compiled, compiled_rows=2 if compiled else None)
    tokens, endings = run_continuously(engine, {0: requests[:2], 2: requests[2:3], 5: requests[3:]})
    for request, prompt, config in zip(requests, CONTINUOUS_PROMPTS, configs):
        [alone] = generate_ids(model, [prompt], config)
        assert tokens[id(request)] == alone.token_ids and endings[id(request)] == alone.finish_reason
    assert engine.cache is None and not engine.rows  # everything freed


def test_a_removed_request_leaves_and_the_rest_decode_as_alone():
    model = tiny_model()
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    requests = [Request(prompt, greedy) for prompt in CONTINUOUS_PROMPTS[:3]]
    engine = Engine(model)
    tokens, endings = run_continuously(engine, {0: requests}, cancel={3: requests[1]})
    assert len(tokens[id(requests[1])]) == 3 and id(requests[1]) not in endings
    for request in (requests[0], requests[2]):
        assert tokens[id(request)] == generate_ids(model, [request.prompt_ids], greedy)[0].token_ids


def test_seeded_rows_of_one_batch_draw_from_their_shared_generator_reproducibly():
    model = tiny_model()
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    first = generate_ids(model, CONTINUOUS_PROMPTS[:3], sampling)
    assert [row.token_ids for row in generate_ids(model, CONTINUOUS_PROMPTS[:3], sampling)] == [
        row.token_ids for row in first
    ]


def test_the_engine_runs_decoders_only():
    # The encoder-decoder has a KV cache too: the family is told by type, not by a `new_cache` attribute.
    config = Seq2SeqConfig(
        vocab_size=50, hidden_size=32, num_encoder_layers=1, num_decoder_layers=1, intermediate_size=64
    )
    with pytest.raises(UserError, match="decoders"):
        Engine(Seq2Seq(config))
