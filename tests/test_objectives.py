"""Every loss in train/objectives.py against its docstring formula, computed by hand on small tensors."""

import math

import pytest
import torch
from torch import nn

from lmforge.data.batches import IGNORE_INDEX
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.electra import Electra
from lmforge.models.encoder import EncoderConfig
from lmforge.train.objectives import (
    causal_lm_loss,
    chat_sft_loss,
    classification_loss,
    distillation_loss,
    dpo_loss,
    masked_lm_loss,
    replaced_token_detection_loss,
    sample_tokens,
    seq2seq_loss,
    sequence_logprobs,
    span_loss,
    token_logprobs,
)

VOCAB = 7


class FixedLogits(nn.Module):
    """A stand-in model whose output is given: the objectives are checked, not a network."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.mlm_head = nn.Identity()

    def forward(self, *args, logits_at=None, **kwargs) -> torch.Tensor:
        return self.logits if logits_at is None else self.logits[logits_at]

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        return self.logits


def log_softmax(row: list[float]) -> list[float]:
    """log softmax of one row of logits, in plain Python floats."""
    top = max(row)
    total = math.log(sum(math.exp(value - top) for value in row)) + top
    return [value - total for value in row]


def nll(row: torch.Tensor, target: int) -> float:
    return -log_softmax(row.tolist())[target]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    return Decoder(config).eval()


def test_causal_lm_loss_is_the_mean_next_token_nll_over_scored_positions(generator):
    model = tiny_decoder()
    inputs = torch.randint(0, VOCAB, (2, 5), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 5), generator=generator)
    targets[0, :2] = IGNORE_INDEX
    loss, tokens = causal_lm_loss(model, (inputs, targets))
    logits = model(inputs)  # (2, 5, V)
    scored = [(b, t) for b in range(2) for t in range(5) if targets[b, t] >= 0]
    expected = sum(nll(logits[b, t], int(targets[b, t])) for b, t in scored) / len(scored)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert tokens == 10


def test_chat_sft_loss_scores_only_assistant_targets_and_counts_real_tokens(generator):
    model = tiny_decoder()
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=generator)
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])  # two conversations, then padding
    targets = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": input_ids, "segment_ids": segment_ids, "targets": targets}
    loss, tokens = chat_sft_loss(model, batch)
    logits = model(input_ids, segment_ids=segment_ids)  # (1, 6, V), attention inside each conversation
    expected = (nll(logits[0, 1], 3) + nll(logits[0, 3], 5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert tokens == 5


def test_masked_lm_loss_averages_over_the_chosen_positions_only(generator):
    logits = torch.randn(2, 4, VOCAB, generator=generator)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[1, 0] = 4, 2, 6
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4), "labels": labels}
    loss, tokens = masked_lm_loss(FixedLogits(logits), batch)
    expected = (nll(logits[0, 1], 4) + nll(logits[1, 3], 2) + nll(logits[1, 0], 6)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert tokens == 8


def test_sample_tokens_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    cumulative = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    # By hand: the first token whose cumulative probability passes the draw.
    for row in range(2):
        for u in (0.0, 0.3, 0.5, 0.74, 0.76, 0.9, 0.999999, 1.0):
            expected = next((v for v in range(4) if cumulative[row, v] > u), 3)
            assert sample_tokens(logits[row : row + 1], torch.tensor([u])).item() == expected
    draws = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_tokens(logits[:1].expand(40_000, 4), draws), minlength=4)
    torch.testing.assert_close(counts / 40_000, torch.softmax(logits[0], dim=-1), atol=0.01, rtol=0)


def test_replaced_token_detection_loss_equals_its_definition():
    torch.manual_seed(0)
    vocab = 6  # so that some samples reproduce the original token, which then counts as original
    config = EncoderConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           dropout=0.0)  # fmt: skip
    model = Electra(config, generator_size=0.5)
    original = torch.randint(0, vocab, (4, 12))
    attention_mask = torch.ones(4, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    chosen = (torch.rand(4, 12) < 0.4) & attention_mask.bool()
    labels = torch.where(chosen, original, IGNORE_INDEX)
    masked = torch.where(chosen, 5, original)  # 5 plays <mask>
    draws = torch.rand(4, 12)
    batch = {"input_ids": masked, "attention_mask": attention_mask, "labels": labels, "draws": draws}
    loss, tokens = replaced_token_detection_loss(model, batch, discriminator_weight=50.0)

    generator_logits = model.generator(masked, attention_mask)  # (B, T, vocab): the MLM head everywhere
    corrupted, generator_terms = original.clone(), []
    for b, t in chosen.nonzero().tolist():
        generator_terms.append(-torch.log_softmax(generator_logits[b, t], dim=-1)[original[b, t]])
        cumulative = torch.softmax(generator_logits[b, t], dim=-1).cumsum(dim=-1).tolist()
        corrupted[b, t] = next((v for v in range(vocab) if cumulative[v] > draws[b, t]), vocab - 1)
    replaced = (corrupted != original).float()
    assert 0 < int((chosen & (corrupted == original)).sum()) < int(chosen.sum())  # both cases occur
    scores = torch.sigmoid(model.discriminator(corrupted, attention_mask))  # (B, T)
    real = attention_mask.bool()
    discriminator_terms = -(replaced * torch.log(scores) + (1 - replaced) * torch.log(1 - scores))[real]
    expected = torch.stack(generator_terms).mean() + 50.0 * discriminator_terms.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert tokens == 44

    # No gradient flows through the sampling: the generator's own layers learn from its MLM loss alone.
    loss.backward()
    through_total = model.generator.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    torch.stack(generator_terms).mean().backward()
    torch.testing.assert_close(through_total, model.generator.layers[0].mlp.up_proj.weight.grad)


def test_classification_loss_is_the_mean_nll_of_each_label(generator):
    logits = torch.randn(3, 4, generator=generator)
    labels = torch.tensor([0, 3, 1])
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5), "labels": labels}
    loss, tokens = classification_loss(FixedLogits(logits), batch)
    expected = sum(nll(logits[b], int(labels[b])) for b in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert tokens == 15


def test_span_loss_averages_the_start_and_end_cross_entropies(generator):
    logits = torch.randn(2, 6, 2, generator=generator)
    starts, ends = torch.tensor([1, 4]), torch.tensor([2, 5])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    batch = {"input_ids": mask, "attention_mask": mask, "token_type_ids": mask, "starts": starts, "ends": ends}
    loss, tokens = span_loss(FixedLogits(logits), batch)
    start_loss = sum(nll(logits[b, :, 0], int(starts[b])) for b in range(2)) / 2
    end_loss = sum(nll(logits[b, :, 1], int(ends[b])) for b in range(2)) / 2
    assert loss.item() == pytest.approx((start_loss + end_loss) / 2, rel=1e-6)
    assert tokens == 11


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_seq2seq_loss_mixes_the_target_nll_with_the_mean_nll_over_the_vocabulary(generator, smoothing):
    logits = torch.randn(2, 3, VOCAB, generator=generator)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [6, 0, 3]])
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4),
        "decoder_input_ids": torch.zeros(2, 3, dtype=torch.long),
        "labels": labels,
    }
    loss, tokens = seq2seq_loss(FixedLogits(logits), batch, label_smoothing=smoothing)
    terms = []
    for b, t in [(b, t) for b in range(2) for t in range(3) if labels[b, t] != IGNORE_INDEX]:
        logp = log_softmax(logits[b, t].tolist())
        terms.append((1 - smoothing) * -logp[int(labels[b, t])] + smoothing / VOCAB * sum(-value for value in logp))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert tokens == 5


def preference_batch(generator):
    """Two pairs: rows 0-1 prompt + chosen, rows 2-3 prompt + rejected; the replies are the scored targets."""
    targets = torch.full((4, 4), IGNORE_INDEX)
    targets[0, 1:3] = torch.tensor([1, 2])
    targets[1, 2:4] = torch.tensor([3, 3])
    targets[2, 1:4] = torch.tensor([4, 5, 6])
    targets[3, 3] = 0
    return {"input_ids": torch.zeros(4, 4, dtype=torch.long), "attention_mask": torch.ones(4, 4), "targets": targets}


def row_logprob(logits: torch.Tensor, targets: torch.Tensor, row: int) -> float:
    return sum(-nll(logits[row, t], int(targets[row, t])) for t in range(targets.shape[1]) if targets[row, t] >= 0)


def test_sequence_logprobs_sum_over_the_reply_tokens(generator):
    batch = preference_batch(generator)
    logits = torch.randn(4, 4, VOCAB, generator=generator)
    values = sequence_logprobs(FixedLogits(logits), batch)
    assert values.tolist() == pytest.approx([row_logprob(logits, batch["targets"], row) for row in range(4)], rel=1e-6)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_loss_is_minus_log_sigmoid_of_the_scaled_margin(generator, sft_weight):
    batch, beta = preference_batch(generator), 0.3
    policy_logits, reference_logits = torch.randn(4, 4, VOCAB, generator=generator), torch.randn(4, 4, VOCAB)
    loss, tokens = dpo_loss(
        FixedLogits(policy_logits), batch, reference=FixedLogits(reference_logits), beta=beta, sft_weight=sft_weight
    )
    targets = batch["targets"]
    policy = [row_logprob(policy_logits, targets, row) for row in range(4)]
    reference = [row_logprob(reference_logits, targets, row) for row in range(4)]
    expected = 0.0
    for pair in range(2):
        margin = (policy[pair] - reference[pair]) - (policy[pair + 2] - reference[pair + 2])
        expected += -math.log(1 / (1 + math.exp(-beta * margin))) / 2
        reply_length = int((targets[pair] >= 0).sum())
        expected += sft_weight * (-policy[pair] / reply_length) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert tokens == 8


def test_distillation_loss_is_alpha_t_squared_kl_plus_the_rest_cross_entropy(generator):
    student_logits = torch.randn(2, 3, VOCAB, generator=generator)
    teacher_logits = torch.randn(2, 3, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (2, 3), generator=generator)
    temperature, alpha = 2.0, 0.3
    loss, tokens = distillation_loss(
        FixedLogits(student_logits), (targets, targets), FixedLogits(teacher_logits), temperature, alpha
    )
    kl, cross_entropy, positions = 0.0, 0.0, [(b, t) for b in range(2) for t in range(3)]
    for b, t in positions:
        log_q = log_softmax((teacher_logits[b, t] / temperature).tolist())
        log_p = log_softmax((student_logits[b, t] / temperature).tolist())
        kl += sum(math.exp(lq) * (lq - lp) for lq, lp in zip(log_q, log_p))
        cross_entropy += nll(student_logits[b, t], int(targets[b, t]))
    expected = alpha * temperature**2 * kl / len(positions) + (1 - alpha) * cross_entropy / len(positions)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert tokens == 6


def test_token_logprobs_of_a_decoder_equal_the_full_logits_and_their_gradients():
    # token_logprobs runs the output layer on the scored tokens only; values and gradients must not change.
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32))
    input_ids = torch.randint(0, 40, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[2, :3] = 0
    targets = torch.full((3, 9), IGNORE_INDEX)
    targets[:, 5:] = torch.randint(0, 40, (3, 4))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}
    logits = model(input_ids, attention_mask=attention_mask)
    expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = expected * (targets != IGNORE_INDEX)
    expected.sum().backward()
    expected_grad = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    actual = token_logprobs(model, batch)
    actual.sum().backward()
    assert actual.shape == (3, 9) and torch.all(actual[:, :5] == 0)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.allclose(model.embed_tokens.weight.grad, expected_grad, atol=1e-5)
