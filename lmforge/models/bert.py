"""Hugging Face BERT folders -> our `Encoder`: config keys, weight names, and loading an encoder to fine-tune.

An HF BERT folder (config.json + model.safetensors, e.g. all-MiniLM-L6-v2 or
bert-base-chinese) maps onto `lmforge.models.encoder` one name to one name.
Only safetensors are read: unpickling `pytorch_model.bin` can run arbitrary
code. It sits in models/, below tasks/, because fine-tuning starts from such a
folder as often as export/hf.py imports one. This module knows names and files;
`transformers` is never imported here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.models import read_model_config
from lmforge.models.encoder import Encoder, EncoderConfig, Head
from lmforge.run_folder import RunFolder, load_tensors, read_json, refuse_pickle_weights

# BertConfig's defaults, for config.json files that leave a key out (transformers reads them the same way).
BERT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
}

# Applied in order to every backbone name: "attention.output.dense" must go before the feed-forward's "output.dense".
BACKBONE_NAMES = [
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.", "layers."),
    ("attention.self.query.", "self_attn.q_proj."),
    ("attention.self.key.", "self_attn.k_proj."),
    ("attention.self.value.", "self_attn.v_proj."),
    ("attention.output.dense.", "self_attn.o_proj."),
    ("attention.output.LayerNorm.", "attention_norm."),
    ("intermediate.dense.", "mlp.up_proj."),
    ("output.dense.", "mlp.down_proj."),
    ("output.LayerNorm.", "mlp_norm."),
]

# HF name prefix -> ours, per head; HF head weights of any other head are dropped.
HEAD_NAMES: dict[str, dict[str, str]] = {
    "none": {},
    "mlm": {
        "cls.predictions.transform.dense.": "mlm_head.dense.",
        "cls.predictions.transform.LayerNorm.": "mlm_head.norm.",
        "cls.predictions.decoder.": "mlm_head.decoder.",
        "cls.predictions.bias": "mlm_head.decoder.bias",  # the same tensor as decoder.bias in HF
    },
    "classify": {"pooler.dense.": "classification_head.pooler.", "classifier.": "classification_head.classifier."},
    "span": {"qa_outputs.": "span_head."},
}
HF_HEAD_PREFIXES = ("pooler.", "classifier.", "qa_outputs.", "cls.")
OUR_HEAD_PREFIXES = ("mlm_head.", "classification_head.", "span_head.", "replaced_token_head.")


def read_bert_config(folder: str | Path) -> EncoderConfig:
    """`folder/config.json` of a Hugging Face BERT model -> the EncoderConfig of the same network (head "none")."""
    path = RunFolder(folder).config
    values = {**BERT_DEFAULTS, **read_json(path)}
    if values.get("model_type") != "bert":
        raise UserError(f"{path}: model_type is {values.get('model_type')!r}; only 'bert' folders can be imported")
    if values["hidden_act"] != "gelu":
        raise UserError(f"{path}: hidden_act {values['hidden_act']!r} is not supported; our encoder uses 'gelu'")
    if values["position_embedding_type"] != "absolute":
        raise UserError(
            f"{path}: position_embedding_type {values['position_embedding_type']!r} is not supported; "
            "our encoder uses 'absolute' (learned) positions"
        )
    ours = {
        "vocab_size": values["vocab_size"],
        "hidden_size": values["hidden_size"],
        "num_layers": values["num_hidden_layers"],
        "num_heads": values["num_attention_heads"],
        "intermediate_size": values["intermediate_size"],
        "max_position_embeddings": values["max_position_embeddings"],
        "position": "learned",
        "type_vocab_size": values["type_vocab_size"],
        "layer_norm_eps": values["layer_norm_eps"],
        "dropout": values["hidden_dropout_prob"],
        "initializer_range": values["initializer_range"],
    }
    return from_dict(EncoderConfig, ours, str(path))


def from_bert_state(state: dict[str, torch.Tensor], head: Head) -> dict[str, torch.Tensor]:
    """HF BERT weight names (with or without the `bert.` prefix) -> ours, keeping only the weights of `head`."""
    head_names = HEAD_NAMES.get(head, {})
    renamed = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        if name == "embeddings.position_ids":  # a buffer older transformers versions saved, not a weight
            continue
        # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.startswith(HF_HEAD_PREFIXES):
            for theirs, ours in head_names.items():
                if name.startswith(theirs):
                    renamed[ours + name.removeprefix(theirs)] = tensor
                    break
            continue
        for theirs, ours in BACKBONE_NAMES:
            name = name.replace(theirs, ours)
        renamed[name] = tensor
    return renamed


def load_backbone(model: Encoder, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load every backbone weight (all must be there) and the head weights that fit; the rest keep their init."""
    own = model.state_dict()
    # A head of another shape (3 labels where the checkpoint has 2) or kind is a new head, not an error.
    tensors = {
        name: tensor
        for name, tensor in tensors.items()
        if not name.startswith(OUR_HEAD_PREFIXES) or (name in own and own[name].shape == tensor.shape)
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if not name.startswith(OUR_HEAD_PREFIXES)]
    if missing or unexpected:
        raise UserError(f"{where} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def with_head(config: EncoderConfig, head: Head, num_labels: int, pooling: str) -> EncoderConfig:
    # Through the config loader, so a misspelled head or pooling is a UserError naming the field.
    values = {**dataclasses.asdict(config), "head": head, "num_labels": num_labels, "pooling": pooling}
    return from_dict(EncoderConfig, values, "model")


def load_bert(
    folder: str | Path, head: Head = "none", num_labels: int = 2, pooling: Literal["cls", "mean"] = "cls"
) -> Encoder:
    """A Hugging Face BERT folder -> our Encoder with `head`; head weights it lacks keep their random init."""
    folder = Path(folder)
    weights = RunFolder(folder).weights
    if not weights.is_file():
        refuse_pickle_weights(folder, "BertForMaskedLM")
    model = Encoder(with_head(read_bert_config(folder), head, num_labels, pooling))
    load_backbone(model, from_bert_state(load_tensors(weights), head), str(weights))
    return model.eval()


def load_encoder(
    folder: str | Path, head: Head, num_labels: int = 2, pooling: Literal["cls", "mean"] = "cls"
) -> Encoder:
    """An encoder to fine-tune: our own run folder (config.json says "family": "encoder") or an HF BERT folder.

    The backbone always loads; the folder's head loads only where it is the requested head with the same shape,
    so an MLM-pretrained encoder becomes a classifier with a fresh classification head.
    """
    run = RunFolder(folder)
    if run.read_config().get("family") != "encoder":
        return load_bert(folder, head, num_labels, pooling)
    config, _ = read_model_config(folder)
    model = Encoder(with_head(config, head, num_labels, pooling))
    load_backbone(model, run.read_weights(), str(folder))
    return model.eval()
