"""The fused linear cross-entropy equals PyTorch's cross-entropy over full logits, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("chunk_rows", [7, 64, 1024])
def test_matches_full_logits_cross_entropy(chunk_rows):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20), generator=generator)
    targets[0, :5] = IGNORE_INDEX
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (2 * expected).backward()
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    actual = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    (2 * actual).backward()
    assert abs(actual.item() - expected.item()) < 1e-5
    assert torch.allclose(hidden.grad, expected_grads[0], atol=1e-6)
    assert torch.allclose(weight.grad, expected_grads[1], atol=1e-6)


def test_no_gradient_work_without_grad():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert abs(loss.item() - F.cross_entropy(hidden @ weight.T, targets).item()) < 1e-5


def test_rows_without_a_target_never_enter_the_product():
    # Chat SFT scores about a tenth of its tokens; the rest must cost nothing. A NaN in an unscored row would
    # poison the loss if that row were multiplied into the vocabulary, so a finite loss shows it was left out.
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 12, 16, generator=generator)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    targets = torch.full((4, 12), IGNORE_INDEX)
    targets[:, -2:] = torch.randint(0, 40, (4, 2), generator=generator)
    expected = F.cross_entropy(hidden[:, -2:].flatten(0, 1) @ weight.T, targets[:, -2:].flatten())
    poisoned = hidden.clone()
    poisoned[:, :-2] = float("nan")
    poisoned.requires_grad_(True)
    actual = linear_cross_entropy(poisoned, weight, targets)
    actual.backward()
    assert abs(actual.item() - expected.item()) < 1e-5
    assert torch.all(poisoned.grad[:, :-2] == 0) and torch.isfinite(weight.grad).all()


def test_no_scored_row_gives_a_zero_loss_and_zero_gradients():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((2, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
