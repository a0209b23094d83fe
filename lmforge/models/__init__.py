"""Model families by name, and saving / loading a model as a run folder's config and weights.

`MODEL_FAMILIES` is the one registry: the name stored in config.json picks the
config dataclass and the module to build. A quantized folder (its config has a
`quantization` entry) gets its quantized layers from `models/quantized.py` first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.quantized import prepare_quantized
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import RunFolder

MODEL_FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "decoder": (DecoderConfig, Decoder),
    "encoder": (EncoderConfig, Encoder),
    "seq2seq": (Seq2SeqConfig, Seq2Seq),
}


def family_of(model: nn.Module) -> str:
    for name, (_, module_class) in MODEL_FAMILIES.items():
        if isinstance(model, module_class):
            return name
    raise TypeError(f"{type(model).__name__} is not a registered model family")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without duplicates of tied weights (safetensors stores each tensor once)."""
    state = model.state_dict()
    for copy in model.tied_weights:
        state.pop(copy, None)
    return state


def model_config(model: nn.Module) -> dict:
    """What config.json holds for `model`: its family and its config dataclass's fields."""
    return {"family": family_of(model), **dataclasses.asdict(model.config)}


def save_model(folder: str | Path, model: nn.Module) -> None:
    run = RunFolder(folder)
    run.write_config(model_config(model))
    run.write_weights(model_state(model))


def load_model_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise UserError(
                f"{where} does not fit its config.json: {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if name not in model.tied_weights]
    if missing or unexpected:
        raise UserError(f"{where} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def read_model_config(folder: str | Path):
    values = dict(RunFolder(folder).read_config())
    if "family" not in values and ("model_type" in values or "architectures" in values):
        raise UserError(
            f"{folder} is a Hugging Face model folder ({values.get('model_type') or values['architectures']}), "
            f"not an lmforge run folder; bring it in first: lmforge import --from {folder} --out runs/NAME"
        )
    family = values.pop("family", "decoder")
    values.pop("quantization", None)  # how the weights are stored, not the network: load_model reads it
    if family not in MODEL_FAMILIES:
        raise UserError(
            f"{RunFolder(folder).config} names unknown model family {family!r}; known: {', '.join(MODEL_FAMILIES)}"
        )
    config_class, module_class = MODEL_FAMILIES[family]
    return from_dict(config_class, values, "model"), module_class


def require_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """A UserError naming the first floating tensor with a NaN or an infinity: such weights only make garbage."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"{where}: weight {name} holds {bad} NaN or infinite values; the model is damaged "
                "(a diverged run or a corrupted file): use an earlier checkpoint"
            )


def load_model(folder: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> nn.Module:
    """Build the model that the folder's config describes and load its weights into it (quantized or not).

    The weights' SHA-256 is checked against the folder's record unless `verify` is False (or
    LMFORGE_SKIP_CHECKSUMS=1); non-finite weights are refused either way.
    """
    run = RunFolder(folder)
    config, module_class = read_model_config(folder)
    model = module_class(config)
    tensors = run.read_weights(verify=verify)
    require_finite(tensors, str(run.weights))
    quantization = run.read_config().get("quantization")
    if quantization:
        tensors = prepare_quantized(model, quantization, tensors, str(folder))
    load_model_weights(model, tensors, str(folder))
    return model.to(device).eval()
