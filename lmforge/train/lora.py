"""Training LoRA adapters (https://arxiv.org/abs/2106.09685): freeze a model, wrap its projections, save the adapter.

`apply_lora` freezes a model and wraps its chosen projections in `models.lora.LoRALinear`; the
training loop then sees only the small A and B matrices as trainable. `save_adapter` writes the
adapter alone in the files and tensor names Hugging Face `peft` uses; loading and merging an adapter
(what inference needs) is `models/lora.py`'s. This module knows module names, not objectives or the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.models.lora import PEFT_PREFIX, LoRAConfig, add_lora_layers, lora_layers
from lmforge.run_folder import RunFolder, write_json


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, replace each nn.Linear whose attribute name is in
    config.module_names() by a LoRALinear; return the dotted names replaced."""
    if not config.enabled:
        raise ValueError("apply_lora needs lora.rank > 0 (rank 0 means: train every weight, without LoRA)")
    return add_lora_layers(model, config)


def lora_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; `parameters()` yields a tied weight once, so it counts once."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors alone under peft's names: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    return state


def save_adapter(folder: str | Path, model: nn.Module, config: LoRAConfig, base: str) -> None:
    """`adapter_model.safetensors` + `adapter_config.json` in the format Hugging Face `peft` reads.

    `base` is stored as `base_model_name_or_path`: the base model the adapter belongs on.
    NOTE: `<module>` is this model's own module name (`layers.0.self_attn.q_proj`), which is what peft
    writes when it wraps this same module. To put the adapter on the Hugging Face Llama export of a
    decoder, rename the modules as `export/hf.py` renames weights (they gain a `model.` prefix).
    """
    state = adapter_state(model)
    if not state:
        raise ValueError("the model has no LoRA layers to save; call apply_lora first")
    run = RunFolder(folder)
    run.write_adapter_weights(state)
    write_json(
        run.adapter_config,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": config.module_names(),
            "bias": "none",
            # Spelled out because they change the numbers: W is (out, in), and the scale is alpha / r, not / sqrt(r).
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        },
    )
