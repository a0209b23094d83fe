"""Magnitude pruning: zero the smallest weights of the linear layers, per layer or globally, then optionally recover.

`magnitude_masks` picks exactly round(sparsity x count) weights to zero, the smallest |w| of each layer
("layer") or of all pruned layers together ("global"; layers with small weights then lose more).
`recover` fine-tunes the pruned model for a few steps with the one training loop and the causal-LM
objective while the mask stays fixed: a gradient hook zeroes the gradient of every pruned weight, so
AdamW's moments for it stay zero and its update (weight decay included) is exactly zero.
`prune_run` writes a normal run folder (dense tensors holding zeros) that every command loads.
The output layer and anything tied to an embedding stay dense, as in the pruning literature
(e.g. https://arxiv.org/abs/2306.11695): the embedding table is one lookup per token, not a matmul.
This module knows weights and masks, not how sparse weights could be stored or computed faster.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.compress import check_folders
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows, lm_windows
from lmforge.device import autocast_dtype, pick_device
from lmforge.errors import UserError
from lmforge.evaluate.perplexity import evaluate_lm
from lmforge.models import load_model, save_model
from lmforge.models.decoder import Decoder
from lmforge.run_folder import RunFolder, write_json
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig, train

SCOPES = {"layer": "the same sparsity in every layer", "global": "the smallest weights of all layers together"}
KEEP_DENSE = ("lm_head",)


def prune_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers to prune: all but the output layer and any whose weight is tied to an embedding."""
    tied = getattr(model, "tied_weights", {})
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in KEEP_DENSE and f"{name}.weight" not in tied
    }


def _smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` smallest scores; ties go to the lower index, so the choice is deterministic."""
    return torch.argsort(scores, stable=True)[:count]


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """{layer name: boolean mask of the weights to keep}, zeroing exactly round(sparsity x weights)."""
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity must be in [0, 1), not {sparsity}")
    if scope not in SCOPES:
        raise UserError(f"unknown pruning scope {scope!r}; known: {', '.join(SCOPES)}")
    targets = prune_targets(model)
    if not targets:
        raise UserError("the model has no linear layers to prune (quantized? prune its float run folder instead)")
    weights = {name: linear.weight.detach() for name, linear in targets.items()}
    masks = {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}
    if scope == "layer":
        for name, weight in weights.items():
            masks[name].view(-1)[_smallest(weight.abs().flatten(), round(sparsity * weight.numel()))] = False
        return masks
    scores = torch.cat([weight.abs().flatten().float() for weight in weights.values()])
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned[_smallest(scores, round(sparsity * scores.numel()))] = True
    for (name, weight), layer_pruned in zip(weights.items(), pruned.split([w.numel() for w in weights.values()])):
        masks[name] = ~layer_pruned.view_as(weight)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, keep in masks.items():
            model.get_submodule(name).weight.mul_(keep)


def sparsity_of(model: nn.Module, names) -> dict[str, float]:
    """{layer name: fraction of its weights that are exactly zero}."""
    return {name: (model.get_submodule(name).weight == 0).float().mean().item() for name in names}


def recover(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    train_windows: LMWindows,
    valid_windows: LMWindows,
    token_bytes: list[bytes],
    config: TrainConfig,
    run_dir: str | Path,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune a pruned model on next-token prediction with its masks fixed; the trainer's metric records.

    The run starts and ends with a validation pass, so the records hold the loss before and after.
    Validation runs under the same autocast as training (bf16 on CUDA with precision "auto").
    """
    handles = [
        model.get_submodule(name).weight.register_hook(lambda gradient, keep=keep: gradient * keep)
        for name, keep in masks.items()
    ]
    evaluate = functools.partial(
        evaluate_lm,
        windows=valid_windows,
        token_bytes=token_bytes,
        batch_size=config.batch_size,
        max_windows=config.eval_windows,
        autocast_dtype=autocast_dtype(next(model.parameters()).device, config.precision),
    )
    batches = functools.partial(train_windows.training_batch, batch_size=config.batch_size)
    try:
        return train(model, causal_lm_loss, batches, config, run_dir, evaluate, progress=progress)
    finally:
        for handle in handles:
            handle.remove()


def _recover_run(
    model: nn.Module, masks: dict[str, torch.Tensor], model_dir: Path, out: Path, data: str, steps: int,
    lr: float, batch_size: int, eval_windows: int, progress: bool,
) -> dict:  # fmt: skip
    """Recovery fine-tuning of a pruned decoder on `data` into `out`; the validation loss before and after."""
    if not isinstance(model, Decoder):
        raise UserError("recovery fine-tuning is for decoders (next-token prediction); prune without it")
    tokenizer = Tokenizer.load(model_dir)
    context = model.config.max_position_embeddings
    train_windows = lm_windows(data, "train", tokenizer, context, progress=progress)
    valid_windows = lm_windows(data, "valid", tokenizer, context, progress=progress)
    if len(train_windows) == 0 or len(valid_windows) == 0:
        raise UserError(f"{data} is too small for recovery: each split needs more than {context} tokens")
    config = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        eval_every=0,
        eval_windows=eval_windows,
        save_every=steps,
        keep_last=1,
    )
    started = time.perf_counter()
    records = recover(model, masks, train_windows, valid_windows, tokenizer.token_bytes(), config, out, progress)
    validations = [record["valid_loss"] for record in records if "valid_loss" in record]
    # The trainer's checkpoint would resume a recovery nobody can ask to resume: only the result is kept.
    shutil.rmtree(RunFolder(out).checkpoints, ignore_errors=True)
    return {
        "valid_loss_before": validations[0],
        "valid_loss_after": validations[-1],
        "minutes": (time.perf_counter() - started) / 60,
    }


def prune_run(
    model_dir: str | Path,
    out: str | Path,
    sparsity: float,
    scope: str = "layer",
    recover_steps: int = 0,
    data: str = "builtin:peoples-daily",
    recover_lr: float = 1e-4,
    batch_size: int = 8,
    eval_windows: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Prune run folder `model_dir` to `sparsity` into the new run folder `out`, recovering for `recover_steps`.

    Returns {"sparsity" (achieved over the pruned layers), "layers", "weights", "zeros", "per_layer" (min, max),
    and with recovery "valid_loss_before" / "valid_loss_after" and "minutes"}.
    """
    model_dir, out = Path(model_dir), Path(out)
    check_folders(model_dir, out, "is quantized; prune its float run folder (then quantize the result)")
    if recover_steps < 0:
        raise UserError(f"--recover-steps must be >= 0, not {recover_steps}")
    model = load_model(model_dir, pick_device(device))
    masks = magnitude_masks(model, sparsity, scope)
    apply_masks(model, masks)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if recover_steps:
        summary = _recover_run(
            model, masks, model_dir, out, data, recover_steps, recover_lr, batch_size, eval_windows, progress
        )
    model.cpu()
    per_layer = sparsity_of(model, masks)
    zeros = sum((model.get_submodule(name).weight == 0).sum().item() for name in masks)
    weights = sum(keep.numel() for keep in masks.values())
    if any((model.get_submodule(name).weight[~keep.cpu()] != 0).any() for name, keep in masks.items()):
        raise RuntimeError("a pruned weight changed during recovery")  # the gradient hooks above prevent this
    save_model(out, model)
    RunFolder(out).copy_companions(model_dir)
    summary.update(
        sparsity=zeros / weights,
        layers=len(masks),
        weights=weights,
        zeros=zeros,
        per_layer=(min(per_layer.values()), max(per_layer.values())),
    )
    write_json(
        RunFolder(out).prune_summary,
        {"source": str(model_dir), "scope": scope, "target_sparsity": sparsity, "recover_steps": recover_steps,
         "data": data if recover_steps else None, **summary},
    )  # fmt: skip
    return summary
