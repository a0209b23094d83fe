"""Optimizers: Muon equals torch.optim.Muon, parameters land in one optimizer each, Muon learns and resumes exactly."""

import numpy as np
import pytest
import torch
from test_trainer import run, tiny_setup

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.train.optim import Muon, build_optimizer, muon_parameter_names
from lmforge.train.trainer import TrainConfig, learning_rate


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_with_bf16_newton_schulz_equals_torch_optim_muon(adjust_lr_fn, nesterov):
    torch.manual_seed(0)
    shapes = [(24, 16), (16, 40), (32, 32)]
    ours_params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    options = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours = Muon(ours_params, newton_schulz_dtype=torch.bfloat16, **options)
    reference = torch.optim.Muon(torch_params, **options)
    for step in range(4):
        grads = [torch.randn(shape, generator=torch.Generator().manual_seed(step * 10 + i)) for i, shape in
                 enumerate(shapes)]  # fmt: skip
        for optimizer, params in ((ours, ours_params), (reference, torch_params)):
            for parameter, grad in zip(params, grads):
                parameter.grad = grad.clone()
            optimizer.step()
    for mine, theirs in zip(ours_params, torch_params):
        assert torch.equal(mine, theirs)


def test_fp32_newton_schulz_orthogonalises_and_leaves_the_momentum_buffer_alone():
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.zeros(8, 32))
    optimizer = Muon([parameter], lr=1.0, nesterov=False, newton_schulz_dtype=torch.float32)
    parameter.grad = torch.randn(8, 32)
    optimizer.step()
    buffer = optimizer.state[parameter]["momentum_buffer"]
    assert torch.allclose(buffer, 0.05 * parameter.grad)  # not normalised in place by Newton–Schulz
    singular_values = torch.linalg.svdvals(-parameter.detach())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # U S' V^T with S' ~ 1 (Keller's bounds)


def names_in(optimizer, model):
    by_tensor = {id(p): name for name, p in model.named_parameters()}
    return [{by_tensor[id(p)] for group in part.param_groups for p in group["params"]} for part in optimizer.parts]


def test_muon_takes_the_hidden_matrices_and_adamw_everything_else_each_parameter_once():
    model, _, _ = tiny_setup(steps=1)
    adamw, muon = names_in(build_optimizer(model, TrainConfig(optimizer="muon")), model)
    every = {name for name, _ in model.named_parameters()}
    assert adamw | muon == every and not adamw & muon
    assert muon == {
        f"layers.{i}.{part}.weight"
        for i in range(2)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight"} <= adamw
    # An encoder: biases, embeddings and the classifier head stay on AdamW.
    encoder = Encoder(EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                    head="classify", num_labels=3))  # fmt: skip
    adamw, muon = names_in(build_optimizer(encoder, TrainConfig(optimizer="muon")), encoder)
    assert muon == muon_parameter_names(encoder) and all(".layers." in f".{n}" for n in muon)
    assert not any("classifier" in name or "bias" in name or "embeddings" in name for name in muon)
    assert any("classifier" in name for name in adamw)
    # AdamW alone: one optimizer with every parameter.
    (alone,) = names_in(build_optimizer(model, TrainConfig()), model)
    assert alone == every


def test_the_schedule_scales_both_learning_rates():
    model, windows, config = tiny_setup(steps=1, optimizer="muon", lr=1e-3, muon_lr=0.02)
    optimizer = build_optimizer(model, config)
    scale = learning_rate(1, config) / config.lr
    adamw_lr, muon_lr = optimizer.set_learning_rate(scale)
    assert adamw_lr == pytest.approx(learning_rate(1, config))
    assert muon_lr == pytest.approx(0.02 * scale)
    assert [group["lr"] for group in optimizer.parts[1].param_groups] == [muon_lr]


def test_loss_falls_with_muon(tmp_path):
    model, windows, config = tiny_setup(steps=60, optimizer="muon", lr=1e-2, muon_lr=0.02)
    losses = [r["loss"] for r in run(model, windows, config, tmp_path)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_resumed_muon_run_equals_an_uninterrupted_one(tmp_path):
    settings = dict(steps=10, optimizer="muon", save_every=4)
    model, windows, config = tiny_setup(**settings)
    uninterrupted = [r["loss"] for r in run(model, windows, config, tmp_path / "full")]
    full_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Stopped by its time budget after step 1, then resumed by a fresh process with a fresh model.
    model, windows, config = tiny_setup(**settings, max_minutes=1e-9)
    run(model, windows, config, tmp_path / "part")
    model, windows, config = tiny_setup(**settings)
    resumed = [r["loss"] for r in run(model, windows, config, tmp_path / "part", resume=True)]
    assert resumed == uninterrupted[1:]
    assert all(torch.equal(p, full_weights[name]) for name, p in model.named_parameters())


def test_optimizer_is_a_recipe_choice():
    assert from_dict(TrainConfig, {"optimizer": "muon", "muon_lr": 0.01}).optimizer == "muon"
    with pytest.raises(UserError, match="optimizer must be one of adamw, muon, not 'sgd'"):
        from_dict(TrainConfig, {"optimizer": "sgd"})
    with pytest.raises(ValueError, match="train.muon_lr must be > 0"):
        TrainConfig(muon_lr=0)
