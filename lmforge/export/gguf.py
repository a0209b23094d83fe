"""A decoder run folder -> one GGUF file that llama.cpp (and llama-cpp-python, Ollama, LM Studio) runs as-is.

The file describes the `llama` architecture: hyperparameters under `llama.*`,
the byte-level BPE tokenizer as llama.cpp's `gpt2` model with the `qwen2`
pre-tokenizer (our split pattern; `llama-bpe` for an imported Llama 3 tokenizer),
the chat template, and the weights under llama.cpp's tensor names. Weights go through Hugging Face's Llama names
(`export/hf.py`) and the `gguf` package's own name table, so there is no second
hand-written map. The conversion follows llama.cpp's `convert_hf_to_gguf.py`
(https://github.com/ggml-org/llama.cpp) for the Llama family.

This module knows GGUF's keys and llama.cpp's conventions; it does not run llama.cpp.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.chat import chat_template
from lmforge.data.tokenizer import LLAMA_CPP_PRE_TOKENIZER, QWEN2_SPLIT_PATTERN, Tokenizer
from lmforge.errors import UserError
from lmforge.export.hf import to_llama_state
from lmforge.lm import load
from lmforge.models import family_of, model_state
from lmforge.models.decoder import Decoder, DecoderConfig

QUANTS = ("f16", "q8_0")
LLAMA3_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# llama.cpp implements a fixed set of split patterns, known by name (`tokenizer.ggml.pre`): ours (and
# imported Qwen2 tokenizers') and Llama 3's, whose only difference is digits in runs of up to three.
PRE_TOKENIZERS = {QWEN2_SPLIT_PATTERN: LLAMA_CPP_PRE_TOKENIZER, LLAMA3_SPLIT_PATTERN: "llama-bpe"}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def rotary_halves_to_pairs(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of q_proj / k_proj (weight or bias) for llama.cpp's rotary layout.

    We (and Hugging Face) rotate dimension i of a head with dimension i + head_dim/2; llama.cpp's
    `llama` architecture rotates neighbours 2i and 2i+1. Putting old row i at 2i and old row i + head_dim/2
    at 2i+1 makes the two rotations the same, and q.k is unchanged because q and k move alike.
    NOTE: this is convert_hf_to_gguf's `LlamaModel.permute`; without it the file loads and writes garbage.
    """
    head_dim = weight.shape[0] // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])  # (heads, half, D/2, in) or no `in`
    return halves.transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> float32 array, q/k rows permuted; `output` is left out when it is tied.

    Qwen2-style q/k/v biases become `blk.N.attn_q.bias` etc., which llama.cpp's `llama` architecture reads.
    """
    gguf = _import_gguf()
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    tensors = {}
    for hf_name, tensor in to_llama_state(model_state(model)).items():
        if ".self_attn.q_proj." in hf_name:
            tensor = rotary_halves_to_pairs(tensor, config.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            tensor = rotary_halves_to_pairs(tensor, config.num_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"no GGUF name for the weight {hf_name}")
        tensors[name] = tensor.detach().to("cpu", torch.float32).numpy()
    return tensors


def encode_tensor(array: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    """(data, GGML type): vectors (norms) stay float32; matrices become f16 or q8_0."""
    gguf = _import_gguf()
    if array.ndim == 1:
        return array, gguf.GGMLQuantizationType.F32
    if quant == "q8_0":
        try:
            return gguf.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:  # rows not a multiple of the 32-value block: keep f16, as convert_hf_to_gguf does
            pass
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _add_hyperparameters(writer, config: DecoderConfig, name: str, quant: str) -> None:
    gguf = _import_gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    gguf = _import_gguf()
    saved = json.loads(tokenizer.to_str())  # tokenizer.json's documented layout
    model = saved["model"]
    steps = (saved.get("pre_tokenizer") or {}).get("pretokenizers", [])
    patterns = [step["pattern"].get("Regex") for step in steps if step["type"] == "Split"]
    # The bytes -> characters step must add nothing: no regex of its own, no leading space.
    byte_level = [
        (step.get("use_regex", True), step.get("add_prefix_space", True))
        for step in steps
        if step["type"] == "ByteLevel"
    ]
    pre = PRE_TOKENIZERS.get(patterns[0]) if len(patterns) == 1 else None
    if model["type"] != "BPE" or pre is None or byte_level != [(False, False)]:
        raise UserError(
            "GGUF export needs a byte-level BPE tokenizer split like ours (Qwen2's pattern) or Llama 3's; "
            "llama.cpp would tokenize this one differently"
        )
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    # Rows the model has beyond the tokenizer get placeholder names, as convert_hf_to_gguf does.
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in saved["added_tokens"]:
        # Specials are CONTROL: llama.cpp matches their text only with parse_special (our `encode` always does)
        # and does not print them; other added tokens are USER_DEFINED, matched and printed as text.
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    if tokenizer.im_end_id is not None:
        writer.add_eot_token_id(tokenizer.im_end_id)  # a chat reply ends here
    # NOTE: our tokenizer_config.json says add_bos_token false because lmforge puts <bos> in itself
    # (`LM.encode_prompt`, the chat template's `bos_token`). llama.cpp must add it: then a plain prompt
    # tokenizes to [<bos>, ...] as `encode_prompt` does, and llama.cpp's chat code, which drops a leading
    # bos_token from the rendered template when add_bos is set, gives the ids our template gives.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    with contextlib.suppress(UserError):  # no template and no ChatML markers: a base model without chat
        writer.add_chat_template(chat_template(tokenizer))


def _write_atomically(writer, path: Path) -> None:
    """Write the file beside `path`, fsync it, then rename it over `path` (as run_folder's writes do)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise


def export(model_dir: str | Path, out: str | Path, quant: str = "f16") -> Path:
    """Write the decoder in `model_dir` (a run folder, or LoRA adapters over one) to the GGUF file `out`."""
    gguf = _import_gguf()
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF quantization {quant!r}; known: {', '.join(QUANTS)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out is a folder: {out}; GGUF export writes one file, e.g. {out / 'model.gguf'}")
    lm = load(model_dir, device="cpu")
    if not isinstance(lm.model, Decoder):
        raise UserError(f"GGUF export is for decoder run folders; {model_dir} holds the {family_of(lm.model)} family")
    config = lm.model.config
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hyperparameters(writer, config, Path(model_dir).resolve().name, quant)
    _add_tokenizer(writer, lm.tokenizer, config.vocab_size)
    for name, array in gguf_tensors(lm.model).items():
        data, ggml_type = encode_tensor(array, quant)
        writer.add_tensor(name, data, raw_dtype=ggml_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(writer, out)
    return out
