"""Hugging Face folders <-> lmforge run folders: config keys, weight names, `export` and `import_folder`.

`export` writes a decoder run folder as a folder `transformers` loads with no custom code:
`LlamaForCausalLM`, or `Qwen2ForCausalLM` for a decoder with q/k/v biases. `import_folder` brings a
Llama or Qwen2 folder in as our decoder, and a BERT folder as our encoder (names from `models/bert.py`).
Our weight names are Hugging Face's without the `model.` prefix. Only safetensors are read: unpickling
`pytorch_model.bin` can run arbitrary code. `transformers` is never imported here; the tests check
every mapping against it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict
from lmforge.data.chat import chat_template
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import load, save_generation_config
from lmforge.models import model_state, save_model
from lmforge.models.bert import from_bert_state, load_backbone, read_bert_config, with_head
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder
from lmforge.run_folder import (
    RunFolder,
    atomic_write_bytes,
    load_tensors,
    read_json,
    refuse_pickle_weights,
    save_tensors,
    write_json,
)

# Our DecoderConfig fields whose config.json key has another name.
HF_DECODER_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}
# model_type -> the causal-LM architecture its config.json names.
DECODER_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def llama_config(config: DecoderConfig) -> dict[str, Any]:
    """The `LlamaConfig` keyword arguments describing the same network as `config` (without q/k/v biases)."""
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


def hf_config(config: DecoderConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """The exported config.json: LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v have biases."""
    values = {
        **llama_config(config),
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        # NOTE: transformers 5 reads "dtype" and calls "torch_dtype" deprecated; older versions load float32 anyway.
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.qkv_bias:
        # NOTE: Llama's attention_bias would also put a bias on o_proj; Qwen2 is Llama with q/k/v biases only.
        sliding = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers}
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **values, **sliding}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **values,
        "attention_bias": False,
        "mlp_bias": False,
    }


def hf_generation_config(sampling: SamplingConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Our sampling defaults as Hugging Face's generation_config.json; a chat turn's end marker also ends generation."""
    values: dict[str, Any] = {
        "do_sample": sampling.temperature > 0,
        "max_new_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.temperature > 0:  # transformers warns about sampling keys when it does not sample
        values.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    end_ids = [tokenizer.eos_id, *[i for i in (tokenizer.im_end_id,) if i is not None and i != tokenizer.eos_id]]
    return {
        **values,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": end_ids if len(end_ids) > 1 else end_ids[0],
        "pad_token_id": tokenizer.pad_id,
    }


def export(model_dir: str | Path, out: str | Path) -> Path:
    """Write a decoder run folder (LoRA adapters merged) as a Hugging Face folder that `transformers` loads as is."""
    model_dir, out = Path(model_dir), Path(out)
    source = RunFolder(model_dir)
    family = source.read_config().get("family", "decoder") if source.has_model() else "decoder"
    if family != "decoder":
        raise UserError(f"{model_dir} holds a {family!r} model; --format hf exports decoders (language models) only")
    require_empty(out)
    lm = load(model_dir, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    try:
        template = chat_template(tokenizer)
    except UserError:  # a tokenizer without chat markers exports without a template
        template = None
    hf_folder = RunFolder(out)
    # Not write_weights: a Hugging Face folder holds only the files transformers knows (no checksums.json).
    save_tensors(hf_folder.weights, to_llama_state(model_state(model)), metadata={"format": "pt"})
    tokenizer.save(out, model_max_length=model.config.max_position_embeddings, chat_template=template)
    write_json(hf_folder.generation, hf_generation_config(lm.defaults, tokenizer))
    # Last: a folder without config.json is plainly an unfinished export.
    hf_folder.write_config(hf_config(model.config, tokenizer, model.embed_tokens.weight.dtype))
    return out


def import_folder(folder: str | Path, out: str | Path) -> str:
    """Bring a Hugging Face Llama, Qwen2 or BERT folder into a new run folder `out`; returns our family name."""
    folder, out = Path(folder), Path(out)
    hf_folder = RunFolder(folder)
    if not hf_folder.has_model():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (no config.json); download one first, "
            f"e.g. hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir {folder}"
        )
    values = hf_folder.read_config()
    if "family" in values and "model_type" not in values:
        raise UserError(
            f"{folder} is already an lmforge run folder (a {values['family']} model); use it as it is, "
            f"e.g. lmforge generate --model {folder} ..., or copy the folder to make a new run"
        )
    model_type = values.get("model_type")
    architectures = values.get("architectures") or []
    require_empty(out)
    if model_type == "bert":
        import_bert(folder, out)
        return "encoder"
    if model_type not in DECODER_TYPES or any(name != DECODER_TYPES[model_type] for name in architectures):
        raise UserError(
            f"{folder} holds {', '.join(architectures) or model_type!r}; lmforge imports Llama and Qwen2 language "
            f"models ({', '.join(DECODER_TYPES.values())}) and BERT encoders"
        )
    config = read_decoder_config(hf_folder.config, values)
    tensors = from_llama_state(read_weights(folder))
    # Buffers older transformers versions saved, and a tied output layer some checkpoints store twice.
    tensors = {
        name: tensor
        for name, tensor in tensors.items()
        if not name.endswith("rotary_emb.inv_freq") and not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    tokenizer_json, tokenizer_config = read_tokenizer_files(folder)
    tokenizer = Tokenizer.from_str(tokenizer_json, tokenizer_config.get("chat_template"))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids, the model only {config.vocab_size}")
    sampling = sampling_from_hf(hf_folder.generation)
    with torch.device("meta"):  # shapes and names only: the weights are the checkpoint's own tensors
        model = Decoder(config)
    check_fit(model, tensors, str(folder))
    model.load_state_dict(tensors, strict=False, assign=True)  # keeps the checkpoint's dtype (bf16 stays bf16)
    save_model(out, model)
    write_tokenizer_files(out, tokenizer_json, tokenizer_config)
    save_generation_config(out, sampling, tokenizer)
    return "decoder"


def import_bert(folder: Path, out: Path) -> None:
    """A BERT folder -> our encoder, with its masked-LM head where the checkpoint has one."""
    tensors = read_weights(folder)
    has_mlm = any(name.removeprefix("bert.").startswith("cls.predictions.") for name in tensors)
    head = "mlm" if has_mlm else "none"
    model = Encoder(with_head(read_bert_config(folder), head, num_labels=2, pooling="cls"))
    load_backbone(model, from_bert_state(tensors, head), str(folder))
    tokenizer_json, tokenizer_config = read_tokenizer_files(folder)
    Tokenizer.from_str(tokenizer_json)  # [PAD] [CLS] [SEP] [UNK] are there
    save_model(out, model.eval())
    write_tokenizer_files(out, tokenizer_json, tokenizer_config)


def read_decoder_config(path: Path, values: dict[str, Any]) -> DecoderConfig:
    """A Llama or Qwen2 config.json -> our DecoderConfig; what our decoder cannot compute is refused."""

    def refuse(what: str) -> None:
        raise UserError(f"{path}: {what} is not supported by lmforge's decoder")

    model_type = values["model_type"]
    missing = [
        key
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if key not in values
    ]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    rope = values.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if values.get("rope_scaling") or rope_type != "default":
        refuse(f"rope scaling ({values.get('rope_scaling') or rope_type})")
    if values.get("quantization_config"):
        refuse(f"a quantized checkpoint ({values['quantization_config'].get('quant_method', 'unknown method')})")
    if values.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {values['hidden_act']!r}")
    if values.get("mlp_bias"):
        refuse("mlp_bias")
    if model_type == "llama" and values.get("attention_bias"):
        refuse("attention_bias (a bias on all four attention projections)")
    if values.get("use_sliding_window") or any(kind != "full_attention" for kind in values.get("layer_types") or []):
        refuse("sliding-window attention")
    ours = {
        "vocab_size": values["vocab_size"],
        "hidden_size": values["hidden_size"],
        "num_layers": values["num_hidden_layers"],
        "num_heads": values["num_attention_heads"],
        "num_kv_heads": values.get("num_key_value_heads") or values["num_attention_heads"],
        "intermediate_size": values["intermediate_size"],
        # LlamaConfig's and Qwen2Config's defaults where a key is left out.
        "max_position_embeddings": values.get("max_position_embeddings", 2048),
        "rope_theta": rope.get("rope_theta", values.get("rope_theta", 10000.0)),
        "rms_norm_eps": values.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": values.get("tie_word_embeddings", False),
        "initializer_range": values.get("initializer_range", 0.02),
        "qkv_bias": model_type == "qwen2",
    }
    try:  # names a bad size (0 heads, a string, negative positions) before any arithmetic on it
        config = from_dict(DecoderConfig, ours, "model")
    except UserError as error:
        # The message names our field; say it with the key config.json has.
        message = re.sub(r"\b(?:model\.)?(\w+)", lambda match: HF_DECODER_KEYS.get(match[1], match[1]), str(error))
        raise UserError(f"{path}: {message}") from None
    if values.get("head_dim") not in (None, config.head_dim):
        refuse(f"head_dim {values['head_dim']} (ours is hidden_size / num_attention_heads = {config.head_dim})")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards model.safetensors.index.json names."""
    single, index = RunFolder(folder).weights, RunFolder(folder).weights_index
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards or any(not isinstance(shard, str) or Path(shard).name != shard for shard in shards):
            raise UserError(f"{index}: its weight_map must name shard files in {folder}")
        tensors = {}
        for shard in shards:
            tensors.update(load_tensors(folder / shard))
        return tensors
    refuse_pickle_weights(folder, "AutoModelForCausalLM")
    raise UserError(f"{folder} has no model.safetensors (or model.safetensors.index.json with its shards)")


def read_tokenizer_files(folder: Path) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json with the chat template in it)."""
    path = RunFolder(folder).tokenizer
    if not path.is_file():
        raise UserError(
            f"{folder} has no tokenizer.json; in a trusted environment, write it with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
        )
    config_path = RunFolder(folder).tokenizer_config
    config = read_json(config_path) if config_path.is_file() else {}
    # Recent transformers versions save the template beside the config; some configs list several by name.
    template_path = folder / "chat_template.jinja"
    if template_path.is_file():
        config["chat_template"] = template_path.read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), list):
        named = {entry.get("name"): entry.get("template") for entry in config["chat_template"]}
        config["chat_template"] = named.get("default")
    return path.read_text(encoding="utf-8"), config


def write_tokenizer_files(out: Path, tokenizer_json: str, tokenizer_config: dict[str, Any]) -> None:
    """The tokenizer files of an imported folder, copied as they are (its chat template included)."""
    atomic_write_bytes(RunFolder(out).tokenizer, tokenizer_json.encode("utf-8"))
    write_json(RunFolder(out).tokenizer_config, tokenizer_config)


def sampling_from_hf(path: Path) -> SamplingConfig:
    """generation_config.json -> our sampling defaults, with Hugging Face's meaning: no do_sample is greedy."""
    values = read_json(path) if path.is_file() else {}
    ours: dict[str, Any] = {"temperature": 0.0, "repetition_penalty": values.get("repetition_penalty") or 1.0}
    if values.get("max_new_tokens") is not None:
        ours["max_new_tokens"] = values["max_new_tokens"]
    if values.get("do_sample"):
        top_k, top_p = values.get("top_k", 50), values.get("top_p")
        ours.update(temperature=values.get("temperature") or 1.0, top_k=top_k or 0, top_p=top_p or 1.0)
    return from_dict(SamplingConfig, ours, str(path))


def check_fit(model: Decoder, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model_state(model)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        raise UserError(f"{where} does not fit its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{where}: {name} has shape {tuple(tensor.shape)}; config.json implies {tuple(expected[name].shape)}"
            )


def require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new folder or remove it first")
