"""LoRA: a fresh wrap changes nothing, training moves only A and B, merging and saving keep the logits."""

import copy
import json

import pytest
import torch
from torch import nn

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.lora import LoRAConfig, LoRALinear, load_adapter, merge_lora
from lmforge.run_folder import RunFolder, load_tensors
from lmforge.train.lora import apply_lora, lora_parameters, save_adapter
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import TrainConfig


def tiny_decoder(**changes) -> Decoder:
    values = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    values.update(changes)
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**values)).eval()


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """(base, LoRA model after 30 steps on one random batch, its LoRA config, the batch's inputs, the losses)."""
    # NOTE: at the default init (std 0.02) the frozen output layer keeps every logit near zero, so no update
    # inside the blocks can move the loss much; a wider init gives the adapter room to show it learns.
    base = tiny_decoder(initializer_range=0.2)
    model = copy.deepcopy(base)
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets="q,v,down")
    apply_lora(model, config)
    # The trainer's own optimizer: it must pick up the LoRA matrices and nothing else.
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    ids = random_ids(4, 17)
    batch = (ids[:, :-1], ids[:, 1:])
    model.train()
    losses = []
    for _ in range(30):
        loss, _ = causal_lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return base, model.eval(), config, ids[:, :-1], losses


def test_fresh_wrap_gives_the_base_logits_exactly():
    base = tiny_decoder(tie_word_embeddings=False)
    model = copy.deepcopy(base)
    replaced = apply_lora(model, LoRAConfig(rank=4, targets="q,k,v,o,gate,up,down"))
    assert len(replaced) == 2 * 7
    assert "layers.1.mlp.down_proj" in replaced and "lm_head" not in replaced
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    # The base weights keep their names; A and B sit beside them.
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names
    assert "layers.0.self_attn.q_proj.lora_A.weight" in names and "layers.0.self_attn.q_proj.lora_B.weight" in names


def test_lora_linear_with_bias_computes_the_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 4, 6)
    expected = x @ (base.weight + 1.5 * layer.lora_B.weight @ layer.lora_A.weight).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged_weight(), base.weight + 1.5 * layer.lora_B.weight @ layer.lora_A.weight)


def test_training_moves_only_the_lora_matrices(trained):
    base, model, _, _, losses = trained
    assert losses[-1] < 0.5 * losses[0]
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, base_state[name]), f"{name} changed"
    assert all(".lora_" in name for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in model.state_dict().items())


def test_trainable_fraction_is_small_for_a_realistic_config():
    config = DecoderConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=704)
    model = Decoder(config)
    full = model.num_parameters()
    apply_lora(model, LoRAConfig(rank=8, targets="q,v"))
    trainable, total = lora_parameters(model)
    # q_proj and v_proj are 256 -> 256: A is (8, 256), B is (256, 8), in each of 6 layers.
    assert trainable == 6 * 2 * (8 * 256 + 256 * 8)
    assert total == full + trainable  # the tied embedding counts once
    assert trainable / total < 0.05


def test_merged_model_gives_the_same_logits(trained):
    base, model, _, ids, _ = trained
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert not any(isinstance(module, LoRALinear) for module in merged.modules())
    assert all(parameter.requires_grad for parameter in merged.parameters())
    assert set(merged.state_dict()) == set(base.state_dict())  # saves like a plain model
    assert isinstance(merged.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=0)
        assert not torch.allclose(merged(ids), base(ids), atol=1e-3)


def test_saved_adapter_loads_onto_a_fresh_base(trained, tmp_path):
    base, model, config, ids, _ = trained
    save_adapter(tmp_path, model, config, base="runs/tiny")
    fresh = copy.deepcopy(base)
    loaded = load_adapter(tmp_path, fresh)
    assert loaded == config
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    assert all(".lora_" in name for name, parameter in fresh.named_parameters() if parameter.requires_grad)


def test_a_damaged_adapter_is_refused(trained, tmp_path):
    _, model, config, _, _ = trained
    save_adapter(tmp_path, model, config, base="runs/tiny")
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's last byte
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged"):
        RunFolder(tmp_path).read_adapter_weights()


def test_adapter_folder_is_in_peft_format(trained, tmp_path):
    _, model, config, _, _ = trained
    save_adapter(tmp_path, model, config, base="runs/tiny")
    # peft reads the first two; checksums.json is lmforge's record of the adapter weights' SHA-256.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "checksums.json",
    ]  # fmt: skip
    tensors = load_tensors(tmp_path / "adapter_model.safetensors")
    expected = set()
    for layer in range(2):
        for module, shape_in, shape_out in (
            ("self_attn.q_proj", 32, 32),
            ("self_attn.v_proj", 32, 32),
            ("mlp.down_proj", 64, 32),
        ):
            prefix = f"base_model.model.layers.{layer}.{module}"
            expected |= {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
            assert tensors[f"{prefix}.lora_A.weight"].shape == (4, shape_in)
            assert tensors[f"{prefix}.lora_B.weight"].shape == (shape_out, 4)
    assert set(tensors) == expected  # LoRA tensors only: no frozen base weight rides along
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["task_type"] == "CAUSAL_LM"
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["lora_dropout"] == 0.05
    assert saved["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert saved["bias"] == "none"
    assert saved["base_model_name_or_path"] == "runs/tiny"
    assert saved["fan_in_fan_out"] is False and saved["use_rslora"] is False


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"targets": "q,lm_head"}, "lm_head"),
        ({"targets": " , "}, "lora.targets"),
        ({"rank": -1}, "lora.rank"),
        ({"alpha": 0.0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field) as error:
        LoRAConfig(**{"rank": 8, **changes})
    if "targets" in changes:
        assert "q, k, v, o, gate, up, down" in str(error.value)


def test_config_from_recipe_values():
    config = from_dict(LoRAConfig, {"rank": 8, "targets": "q, v, gate"}, "lora")
    assert config.enabled and config.module_names() == ["q_proj", "v_proj", "gate_proj"]
    assert not LoRAConfig().enabled
    with pytest.raises(UserError, match="unknown qq"):
        from_dict(LoRAConfig, {"rank": 8, "targets": "qq"}, "lora")


def test_no_matching_module_is_a_user_error():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 4))
    with pytest.raises(UserError, match="q_proj.*fc"):
        apply_lora(model, LoRAConfig(rank=2, targets="q"))
    assert model.fc.weight.requires_grad  # nothing frozen on failure


def test_adapter_that_does_not_fit_names_the_tensor(trained, tmp_path):
    base, model, config, _, _ = trained
    save_adapter(tmp_path, model, config, base="runs/tiny")
    wider = tiny_decoder(hidden_size=48)
    with pytest.raises(UserError, match="layers.0.self_attn.q_proj.lora_A.weight"):
        load_adapter(tmp_path, wider)
    assert not any(isinstance(module, LoRALinear) for module in wider.modules())  # left as it was
    tensors = load_tensors(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.layers.1.mlp.down_proj.lora_B.weight"]
    RunFolder(tmp_path).write_adapter_weights(tensors)  # through the run folder, so its checksum follows
    with pytest.raises(UserError, match=r"missing \['base_model.model.layers.1.mlp.down_proj.lora_B.weight'\]"):
        load_adapter(tmp_path, copy.deepcopy(base))
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="missing weights file"):
        load_adapter(tmp_path, copy.deepcopy(base))
    with pytest.raises(UserError, match="missing file"):
        load_adapter(tmp_path / "nowhere", copy.deepcopy(base))


def test_tied_embeddings_stay_tied_and_frozen():
    model = tiny_decoder(tie_word_embeddings=True)
    apply_lora(model, LoRAConfig(rank=2, targets="q,k,v,o,gate,up,down"))
    assert model.embed_tokens.weight is model.lm_head.weight
    assert not model.embed_tokens.weight.requires_grad
    merge_lora(model)
    assert model.embed_tokens.weight is model.lm_head.weight
    assert model.embed_tokens.weight.requires_grad
