"""The mapping between our decoder and Hugging Face's `LlamaForCausalLM`: config keys and weight names.

Pure data: no `transformers` import here, so the mapping can be used (and
tested against the real library) without making it a runtime dependency.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.models.decoder import DecoderConfig


def llama_config(config: DecoderConfig) -> dict[str, Any]:
    """The `LlamaConfig` keyword arguments describing the same network as `config`."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def to_llama_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weight names -> Hugging Face's: everything but the output layer lives under `model.`."""
    return {name if name == "lm_head.weight" else f"model.{name}": tensor for name, tensor in state.items()}


def from_llama_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}
