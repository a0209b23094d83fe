"""Making trained models smaller and faster: weight quantization (`quantize.py`) and magnitude pruning (`prune.py`).

Both read a float run folder and write a new one that every lmforge command loads like any other; the
quantized layers themselves live in `models/quantized.py`, beside the models that load them.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import UserError
from lmforge.run_folder import RunFolder


def check_folders(model_dir: str | Path, out: str | Path, if_quantized: str) -> None:
    """Refuse a source that is not a float model folder (`if_quantized` ends the message for a quantized one)
    and an output folder that is the source itself."""
    source = RunFolder(model_dir)
    if not source.has_model():
        raise UserError(f"{model_dir} is not a model folder: it has no {RunFolder.CONFIG}")
    if source.read_config().get("quantization"):
        raise UserError(f"{model_dir} {if_quantized}")
    if Path(out).resolve() == Path(model_dir).resolve():
        raise UserError("--out must be a new folder, not the model folder itself")
