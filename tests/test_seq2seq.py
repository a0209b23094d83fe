"""The encoder-decoder's invariants (cache, padding, causality), its searches, a task it must learn, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.generate.seq2seq_search import beam_search, greedy_search, sample_search
from lmforge.models import load_model, save_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import load_tensors

PAD, BOS, EOS = 0, 1, 2


def tiny_model(seed: int = 0, **changes) -> Seq2Seq:
    values = dict(
        vocab_size=29,
        hidden_size=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        dropout=0.0,
    )
    values.update(changes)
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(**values)).eval()


def right_pad(sequences: list[list[int]], value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), longest), value, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def random_sequences(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for length in lengths]


@pytest.mark.parametrize("position, norm", [("learned", "pre"), ("rotary", "pre"), ("learned", "post")])
def test_cached_decoding_equals_teacher_forcing(position, norm):
    model = tiny_model(position=position, norm=norm)
    source, source_mask = right_pad(random_sequences([7, 4], 29, seed=1))
    decoder_input_ids = torch.randint(3, 29, (2, 12))
    with torch.no_grad():
        full = model(source, source_mask, decoder_input_ids)
        memory_kv = model.cross_kv(model.encode(source, source_mask))
        cache = model.new_cache(batch_size=2, max_length=12)
        steps = [model.decode(decoder_input_ids[:, :3], memory_kv, source_mask, cache=cache)]
        for position_index in range(3, 12):
            step_ids = decoder_input_ids[:, position_index : position_index + 1]
            steps.append(model.decode(step_ids, memory_kv, source_mask, cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_padded_batch_rows_equal_rows_alone(position):
    model = tiny_model(position=position)
    sources = random_sequences([3, 9, 6], 29, seed=2)
    targets = [[BOS] + target for target in random_sequences([5, 2, 8], 29, seed=3)]
    # Padding holds real-looking tokens, so only the masks can keep it out.
    source, source_mask = right_pad(sources, value=7)
    decoder_input_ids, decoder_mask = right_pad(targets, value=11)
    with torch.no_grad():
        memory = model.encode(source, source_mask)
        logits = model(source, source_mask, decoder_input_ids, decoder_mask)
        unmasked_targets = model(source, source_mask, decoder_input_ids)  # right padding: causality alone suffices
        for row, (source_ids, target_ids) in enumerate(zip(sources, targets)):
            alone_source, alone_target = torch.tensor([source_ids]), torch.tensor([target_ids])
            alone_memory = model.encode(alone_source)
            alone_logits = model(alone_source, None, alone_target)
            assert (memory[row, : len(source_ids)] - alone_memory[0]).abs().max().item() < 1e-5
            assert (logits[row, : len(target_ids)] - alone_logits[0]).abs().max().item() < 1e-5
            assert (unmasked_targets[row, : len(target_ids)] - alone_logits[0]).abs().max().item() < 1e-5
    assert torch.isfinite(logits).all()


def test_future_decoder_tokens_never_change_earlier_logits():
    model = tiny_model()
    source, source_mask = right_pad(random_sequences([6, 4], 29, seed=4))
    decoder_input_ids = torch.randint(3, 29, (2, 10))
    changed = decoder_input_ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1 - 3) % 26 + 3
    with torch.no_grad():
        original = model(source, source_mask, decoder_input_ids)
        altered = model(source, source_mask, changed)
    assert torch.equal(original[:, :6], altered[:, :6])
    assert not torch.allclose(original[:, 6:], altered[:, 6:])


def test_padded_source_positions_change_nothing():
    model = tiny_model()
    source, source_mask = right_pad(random_sequences([8, 3], 29, seed=5))
    changed = source.masked_fill(source_mask == 0, 17)
    decoder_input_ids = torch.randint(3, 29, (2, 6))
    with torch.no_grad():
        memory, altered_memory = model.encode(source, source_mask), model.encode(changed, source_mask)
        logits = model(source, source_mask, decoder_input_ids)
        altered_logits = model(changed, source_mask, decoder_input_ids)
        # The check can fail: without the mask the same change does move the logits.
        unmasked, altered_unmasked = model(source, None, decoder_input_ids), model(changed, None, decoder_input_ids)
    real = source_mask.bool()
    assert (memory[real] - altered_memory[real]).abs().max().item() < 1e-6
    assert (logits - altered_logits).abs().max().item() < 1e-6
    assert not torch.allclose(unmasked[1], altered_unmasked[1])


def peaked_model(seed: int) -> Seq2Seq:
    """A random model with a small vocabulary and a wide init: confident, and eos comes up often."""
    return tiny_model(seed, vocab_size=8, initializer_range=0.3)


def sequence_log_prob(model: Seq2Seq, source_ids: list[int], tokens: list[int], max_new_tokens: int) -> float:
    """Teacher-forced log-prob of a search result, counting eos when the result ended there."""
    labels = tokens + ([EOS] if len(tokens) < max_new_tokens else [])
    decoder_input_ids = torch.tensor([[BOS] + tokens])[:, : len(labels)]
    with torch.no_grad():
        log_probs = model(torch.tensor([source_ids]), None, decoder_input_ids).log_softmax(dim=-1)[0]
    return log_probs[torch.arange(len(labels)), torch.tensor(labels)].sum().item()


def test_beam_search_with_one_beam_is_greedy_search():
    stopped_early = 0
    for seed in range(6):
        model = peaked_model(seed)
        sources = random_sequences([6, 2, 4, 5], 8, seed=seed)
        source, source_mask = right_pad(sources)
        greedy = greedy_search(model, source, source_mask, BOS, EOS, max_new_tokens=10)
        beam = beam_search(model, source, source_mask, BOS, EOS, max_new_tokens=10, num_beams=1, length_penalty=0.0)
        assert beam == greedy
        assert greedy == [greedy_search(model, torch.tensor([ids]), None, BOS, EOS, 10)[0] for ids in sources]
        stopped_early += sum(len(tokens) < 10 for tokens in greedy)
    assert stopped_early >= 3  # eos really ended some rows
    assert all(EOS not in tokens for tokens in greedy)  # eos ends a result and is not part of it


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_scores_at_least_greedy(length_penalty):
    """Beam search's answer never scores below greedy's, by its own score: log-prob / length**length_penalty."""

    def score(model, source_ids, tokens):
        length = len(tokens) + (len(tokens) < 8)  # eos counts when the hypothesis finished
        return sequence_log_prob(model, source_ids, tokens, 8) / max(length, 1) ** length_penalty

    improved = 0
    for seed in range(6):
        model = peaked_model(seed)
        sources = random_sequences([6, 3, 5], 8, seed=100 + seed)
        source, source_mask = right_pad(sources)
        greedy = greedy_search(model, source, source_mask, BOS, EOS, max_new_tokens=8)
        beam = beam_search(model, source, source_mask, BOS, EOS, 8, num_beams=4, length_penalty=length_penalty)
        for row, source_ids in enumerate(sources):
            greedy_score, beam_score = score(model, source_ids, greedy[row]), score(model, source_ids, beam[row])
            assert beam_score >= greedy_score - 1e-4
            improved += beam_score > greedy_score + 1e-4
            alone = beam_search(model, torch.tensor([source_ids]), None, BOS, EOS, 8, 4, length_penalty)
            assert alone[0] == beam[row]
    assert improved > 0  # the test can tell beam search from greedy search


def test_sampling_at_a_vanishing_temperature_is_greedy_search():
    for seed in range(3):
        model = peaked_model(seed)
        source, source_mask = right_pad(random_sequences([6, 2, 4, 5], 8, seed=seed))
        greedy = greedy_search(model, source, source_mask, BOS, EOS, max_new_tokens=10)
        samples = sample_search(model, source, source_mask, BOS, EOS, 10, num_samples=3, temperature=1e-6)
        assert samples == [[tokens] * 3 for tokens in greedy]


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampled_first_tokens_follow_the_softmax_at_the_temperature(temperature):
    model = peaked_model(1)
    sources = random_sequences([5, 3], 8, seed=7)
    source, source_mask = right_pad(sources)
    generator = torch.Generator().manual_seed(0)
    samples = sample_search(model, source, source_mask, BOS, EOS, 1, 4000, temperature, generator=generator)
    for source_ids, drawn in zip(sources, samples):
        with torch.no_grad():
            logits = model(torch.tensor([source_ids]), None, torch.tensor([[BOS]]))[0, -1]
        expected = (logits / temperature).softmax(dim=-1)
        first = torch.tensor([tokens[0] if tokens else EOS for tokens in drawn])
        observed = torch.bincount(first, minlength=expected.numel()).float() / len(drawn)
        # 4,000 draws: each frequency lies within 0.03 of its probability (over 4 standard deviations).
        assert (observed - expected).abs().max().item() < 0.03
    assert samples[0] != samples[1]  # the two sources really have different distributions


def test_seeded_sampling_repeats_and_respects_ngram_blocking():
    model = peaked_model(2)
    source, source_mask = right_pad(random_sequences([6, 4], 8, seed=3))

    def draw(seed: int) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(seed)
        return sample_search(model, source, source_mask, BOS, EOS, 12, 16, no_repeat_ngram_size=2, generator=generator)

    first = draw(0)
    assert first == draw(0) and first != draw(1)
    assert [len(per_source) for per_source in first] == [16, 16]
    for tokens in (tokens for per_source in first for tokens in per_source):
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams)) and EOS not in tokens
    with pytest.raises(ValueError, match="num_samples"):
        sample_search(model, source, source_mask, BOS, EOS, 4, 0)


def reversal_batch(generator: torch.Generator, size: int) -> list[list[int]]:
    lengths = torch.randint(2, 7, (size,), generator=generator).tolist()
    return [torch.randint(3, 13, (length,), generator=generator).tolist() for length in lengths]  # digits 3..12


def test_tiny_model_learns_to_reverse_digits():
    model = tiny_model(
        vocab_size=13, hidden_size=64, num_heads=4, intermediate_size=128, max_position_embeddings=16
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        sources = reversal_batch(generator, 64)
        targets = [source[::-1] for source in sources]
        source, source_mask = right_pad(sources)
        decoder_input_ids, decoder_mask = right_pad([[BOS] + target for target in targets])
        labels, _ = right_pad([target + [EOS] for target in targets], value=-100)
        logits = model(source, source_mask, decoder_input_ids, decoder_mask)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:10]) / 10
    model.eval()
    sources = reversal_batch(torch.Generator().manual_seed(1), 40)
    source, source_mask = right_pad(sources)
    expected = [source_ids[::-1] for source_ids in sources]
    greedy = greedy_search(model, source, source_mask, BOS, EOS, max_new_tokens=10)
    beam = beam_search(model, source, source_mask, BOS, EOS, max_new_tokens=10, num_beams=3)
    assert sum(output == target for output, target in zip(greedy, expected)) >= 36
    assert sum(output == target for output, target in zip(beam, expected)) >= 36


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(position="rotary")
    save_model(tmp_path, model)
    stored = load_tensors(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and "decoder_embeddings.word_embeddings.weight" not in stored
    assert sum(tensor.numel() for tensor in stored.values()) == model.num_parameters()
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "seq2seq"
    loaded = load_model(tmp_path)
    assert isinstance(loaded, Seq2Seq)
    assert loaded.lm_head.weight is loaded.encoder.embeddings.word_embeddings.weight
    assert loaded.decoder_embeddings.word_embeddings.weight is loaded.encoder.embeddings.word_embeddings.weight
    source, source_mask = right_pad(random_sequences([5, 3], 29, seed=6))
    decoder_input_ids = torch.randint(3, 29, (2, 4))
    with torch.no_grad():
        assert torch.equal(
            model(source, source_mask, decoder_input_ids), loaded(source, source_mask, decoder_input_ids)
        )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.num_decoder_layers"):
        Seq2SeqConfig(num_decoder_layers=0)
    with pytest.raises(ValueError, match="model.hidden_size"):
        Seq2SeqConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="model.dropout"):
        Seq2SeqConfig(dropout=1.0)


def test_too_long_inputs_are_refused():
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode(torch.ones(1, 9, dtype=torch.long))
    memory_kv = model.cross_kv(model.encode(torch.ones(1, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.decode(torch.ones(1, 9, dtype=torch.long), memory_kv, None)


def test_the_pointer_gives_a_distribution_that_only_copies_real_source_tokens():
    model = tiny_model(copy=True)
    sources = random_sequences([7, 3], 29, seed=4)
    source, source_mask = right_pad(sources, value=28)  # the pad id is an ordinary token: only the mask hides it
    decoder_input_ids = torch.randint(3, 29, (2, 6))
    with torch.no_grad():
        log_probs = model(source, source_mask, decoder_input_ids)
        assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(2, 6), atol=1e-5)
        # With the generator switched off, all mass sits on the ids of the real source tokens.
        model.copy_gate.bias.fill_(-1e4)
        copied = model(source, source_mask, decoder_input_ids).exp()
    for row, ids in enumerate(sources):
        assert torch.allclose(copied[row][:, sorted(set(ids))].sum(-1), torch.ones(6), atol=1e-5)
        others = sorted(set(range(29)) - set(ids))
        assert copied[row][:, others].max() < 1e-6


def test_a_copying_model_decodes_with_the_cache_as_it_trains():
    model = tiny_model(copy=True)
    source, source_mask = right_pad(random_sequences([7, 4], 29, seed=5))
    decoder_input_ids = torch.randint(3, 29, (2, 8))
    with torch.no_grad():
        full = model(source, source_mask, decoder_input_ids)
        memory_kv = model.cross_kv(model.encode(source, source_mask), source)
        cache = model.new_cache(batch_size=2, max_length=8)
        steps = [model.decode(decoder_input_ids[:, i : i + 1], memory_kv, source_mask, cache=cache) for i in range(8)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    greedy = greedy_search(model, source, source_mask, BOS, EOS, max_new_tokens=6)
    beam = beam_search(model, source, source_mask, BOS, EOS, max_new_tokens=6, num_beams=1, length_penalty=0.0)
    assert greedy == beam


def test_ngram_blocking_rules_out_exactly_the_tokens_that_would_repeat_an_ngram():
    from lmforge.generate.seq2seq_search import ban_repeated_ngrams

    logits = torch.zeros(3, 10)
    histories = [[1, 2, 3, 1, 2], [4, 4], [5]]
    ban_repeated_ngrams(logits, histories, size=3)
    # Row 0 ends with (1, 2), which was followed by 3 before; rows 1 and 2 hold no complete trigram yet.
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [3]
    assert not torch.isinf(logits[1:]).any()
    bigrams = torch.zeros(1, 10)
    ban_repeated_ngrams(bigrams, [[7, 8, 7, 9, 7]], size=2)
    assert torch.isinf(bigrams[0]).nonzero().flatten().tolist() == [8, 9]
