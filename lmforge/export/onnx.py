"""A run folder -> a folder onnxruntime runs: `model.onnx` plus the run's config and tokenizer files.

Decoder run folders give one graph that serves both the prompt and every later step
(the input and output names Hugging Face Optimum and transformers.js use):

    inputs   input_ids (batch, sequence)
             attention_mask (batch, past + sequence), 1 = real token; left padding is fine
             past_key_values.N.key, past_key_values.N.value (batch, kv_heads, past, head_dim); past = 0 for a prompt
    outputs  logits (batch, sequence, vocab)
             present.N.key, present.N.value (batch, kv_heads, past + sequence, head_dim)

Position ids are computed from the attention mask inside the graph, as our decoder does, so they
are not an input. Encoder run folders give input_ids, attention_mask (and token_type_ids when the
model has segments) -> last_hidden_state, or `logits` when the model has a task head.

The graphs come from torch.onnx's dynamo exporter (torch.export underneath): the TorchScript one
has no translation for `rms_norm` (torch 2.13). The math is our own modules, reused; this module
only knows the graph's signature and a cache object that concatenates instead of preallocating.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.lm import load
from lmforge.models import family_of
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.run_folder import RunFolder, atomic_write_bytes

MODEL_FILE = "model.onnx"
# Copied next to model.onnx so the folder is all a runtime needs.
COMPANION_FILES = (RunFolder.CONFIG, *RunFolder.COMPANIONS)
ENCODER_OUTPUTS = {"none": "last_hidden_state", "mlm": "logits", "classify": "logits", "span": "logits",
                   "replaced_token": "logits"}  # fmt: skip
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a model with its weights inside


class PastKeyValues:
    """What `Decoder.hidden_states` asks of a KV cache, over past tensors given as graph inputs.

    `KVCache` writes into a preallocated buffer, which a graph cannot take from outside; here
    each layer's keys and values grow by concatenation, and the results are the graph's presents.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values  # each (B, KV, past, D)
        self.length = keys[0].shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: (B, KV, T, D) -> (B, KV, past + T, D)
        self.keys[layer] = torch.cat((self.keys[layer], keys), dim=2)
        self.values[layer] = torch.cat((self.values[layer], values), dim=2)
        return self.keys[layer], self.values[layer]

    def advance(self, num_tokens: int) -> None:
        pass  # `length` is read once per pass, before any update


class DecoderWithPast(nn.Module):
    """(input_ids, attention_mask, past key, past value, ... per layer) -> (logits, present key, value, ...)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past_key_values: torch.Tensor):
        cache = PastKeyValues(list(past_key_values[0::2]), list(past_key_values[1::2]))
        logits = self.decoder(input_ids, attention_mask=attention_mask, cache=cache)  # (B, T, V)
        presents = [tensor for pair in zip(cache.keys, cache.values) for tensor in pair]
        return logits, *presents


def decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph, in order."""
    pairs = [(f"{layer}.key", f"{layer}.value") for layer in range(num_layers)]
    past = [f"past_key_values.{name}" for pair in pairs for name in pair]
    present = [f"present.{name}" for pair in pairs for name in pair]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def _export_decoder(decoder: Decoder):
    config = decoder.config
    batch, past, length = 2, 3, 4  # example sizes; none may be 0 or 1, which torch.export would specialise on
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.ones(batch, past + length, dtype=torch.long)
    past_shape = (batch, config.num_kv_heads, past, config.head_dim)
    past_key_values = [torch.zeros(past_shape) for _ in range(2 * config.num_layers)]
    input_names, output_names = decoder_names(config.num_layers)
    dynamic_shapes = {
        "input_ids": {0: "batch", 1: "sequence_length"},
        "attention_mask": {0: "batch", 1: "total_sequence_length"},
        "past_key_values": tuple({0: "batch", 2: "past_sequence_length"} for _ in past_key_values),
    }
    args = (input_ids, attention_mask, *past_key_values)
    return _export(DecoderWithPast(decoder), args, dynamic_shapes, input_names, output_names)


def _export_encoder(encoder: Encoder):
    config = encoder.config
    batch, length = 2, 3
    args = [torch.zeros(batch, length, dtype=torch.long), torch.ones(batch, length, dtype=torch.long)]
    input_names = ["input_ids", "attention_mask"]
    if config.type_vocab_size:
        args.append(torch.zeros(batch, length, dtype=torch.long))
        input_names.append("token_type_ids")
    axes = {0: "batch", 1: "sequence_length"}
    dynamic_shapes = dict.fromkeys(("input_ids", "attention_mask", "token_type_ids")[: len(args)], axes)
    return _export(encoder, tuple(args), dynamic_shapes, input_names, [ENCODER_OUTPUTS[config.head]])


def _export(module: nn.Module, args: tuple, dynamic_shapes: dict, input_names: list[str], output_names: list[str]):
    # Quiet what is not ours to act on: a logged warning per torchvision operator when torchvision is absent,
    # each named axis torch.export merges with an equal one ("batch" of every input), deprecated pytree calls.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    return program.model_proto


def export(model_dir: str | Path, out: str | Path) -> Path:
    """Write `out/model.onnx` for the decoder or encoder in `model_dir`, with its config and tokenizer beside it."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    model_dir, out = Path(model_dir), Path(out)
    if out.is_file():
        raise UserError(f"--out is a file: {out}; ONNX export writes a folder (model.onnx, config, tokenizer)")
    model = load(model_dir, device="cpu").model.float()
    if sum(parameter.numel() * 4 for parameter in model.parameters()) > MAX_PROTO_BYTES:
        raise UserError("the model is over 2 GB in float32, more than one ONNX file holds with its weights inside")
    if getattr(model, "rotary", None) is not None:  # a graph holds the whole rotary table, not a lazily grown one
        model.rotary.ensure(model.config.max_position_embeddings)
    if isinstance(model, Decoder):
        proto = _export_decoder(model)
    elif isinstance(model, Encoder):
        proto = _export_encoder(model)
    else:
        family = family_of(model)
        raise UserError(f"ONNX export is for decoder and encoder run folders; {model_dir} holds the {family} family")
    atomic_write_bytes(out / MODEL_FILE, proto.SerializeToString())
    for name in COMPANION_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out
