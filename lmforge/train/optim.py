"""Optimizers: AdamW for every parameter, or Muon for the hidden matrices beside AdamW for the rest.

`train.optimizer: adamw` is AdamW with weight decay on matrices only (not on
norms and biases). `train.optimizer: muon` follows the Muon authors
(https://kellerjordan.github.io/posts/muon/): Muon orthogonalises the update
of each 2-D weight inside the model's blocks (attention and MLP projections),
AdamW keeps everything else: embeddings, norms, biases and the output layer
(lm_head, classifier heads), which sit outside the blocks. Both are stepped,
zeroed and scheduled as one `Optimizers`; the schedule scales each optimizer's
own peak learning rate (`train.lr`, `train.muon_lr`) by the same factor.

This module knows parameters and their update rules, not the training loop,
the schedule's shape or checkpoints (which store every optimizer's state by
parameter name, see train/distributed.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmforge.device import autocast_dtype

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic Newton–Schulz
NS_STEPS = 5


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable 2-D weights of the nn.Linear layers inside the model's blocks (its nn.ModuleLists).

    Embeddings, norms, biases and the layers outside the blocks (lm_head, classifier and MLM heads, the copy
    mechanism) are left out: the Muon authors keep those on AdamW.
    """
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    names = set()
    for list_name, blocks in model.named_modules():
        if not isinstance(blocks, nn.ModuleList):
            continue
        for name, module in blocks.named_modules(prefix=list_name):
            if isinstance(module, nn.Linear) and module.weight.dim() == 2 and f"{name}.weight" in trainable:
                names.add(f"{name}.weight")
    return names


def _canonical(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's module., torch.compile's _orig_mod.)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name.removeprefix(prefix)
    return name


class Optimizers:
    """One or two torch optimizers that the training loop steps, zeroes and schedules as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], peak_lrs: list[float]) -> None:
        self.parts = tuple(optimizers)
        self.peak_lrs = tuple(peak_lrs)

    def step(self) -> None:
        for optimizer in self.parts:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.parts:
            optimizer.zero_grad(set_to_none=set_to_none)

    def set_learning_rate(self, scale: float) -> list[float]:
        """Each optimizer's learning rate = its peak x `scale` (warm-up, decay, rollbacks); the rates set."""
        rates = [peak * scale for peak in self.peak_lrs]
        for optimizer, rate in zip(self.parts, rates):
            for group in optimizer.param_groups:
                group["lr"] = rate
        return rates


def build_optimizer(model: nn.Module, config: Any) -> Optimizers:
    """The optimizer(s) `config.optimizer` names (a TrainConfig), over `model`'s trainable parameters."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    device = named[0][1].device if named else torch.device("cpu")
    hidden = muon_parameter_names(model) if config.optimizer == "muon" else set()
    hidden = {_canonical(name) for name in hidden}
    matrices = [p for name, p in named if _canonical(name) in hidden]
    rest = [(name, p) for name, p in named if _canonical(name) not in hidden]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # NOTE: the fused kernel updates all parameters in one pass; it exists for CPU and CUDA.
    fused = device.type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)
    if not matrices:
        return Optimizers([adamw], [config.lr])
    muon = Muon(
        matrices,
        lr=config.muon_lr,
        weight_decay=config.muon_weight_decay,
        adjust_lr_fn=config.muon_adjust_lr,
        newton_schulz_dtype=newton_schulz_dtype(device),
    )
    return Optimizers([adamw, muon], [config.lr, config.muon_lr])


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where this machine multiplies bf16 matrices fast (CUDA, AMX/AVX-512 CPUs), fp32 elsewhere."""
    return autocast_dtype(device, "auto") or torch.float32


def newton_schulz(update: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """U S' V^T with S' ~ 1 for update = U S V^T: torch.optim.Muon's quintic Newton–Schulz iteration, in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype, copy=True)  # (rows, columns); a copy: the update may be the momentum buffer itself
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T  # iterate on the wide side: the Gram matrix is the smaller one
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm = 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (momentum, Nesterov, Newton–Schulz, decoupled weight decay, lr adjustment).

    NOTE: torch.optim.Muon (2.13) runs Newton–Schulz in bf16 always; on a CPU without fast bf16 (AVX2 only)
    that is ~100x slower than fp32 and makes each step take seconds. This is the same algorithm with the
    Newton–Schulz dtype chosen per machine; with bf16 it equals torch.optim.Muon bit for bit (tests/test_optim.py).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str = "original",
        newton_schulz_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.dim() != 2:
                    raise ValueError(
                        f"Muon updates 2-D matrices only, not a parameter of shape {tuple(parameter.shape)}"
                    )
        self.adjust_lr_fn = adjust_lr_fn
        self.newton_schulz_dtype = newton_schulz_dtype

    def adjusted_lr(self, lr: float, shape: torch.Size) -> float:
        """ "original": the update's spectral norm is lr (x sqrt(rows/columns) for tall matrices), whatever the width;
        "match_rms_adamw": its RMS is 0.2 lr, like AdamW's, so AdamW's learning rate carries over (Moonshot)."""
        rows, columns = shape[:2]
        if self.adjust_lr_fn == "match_rms_adamw":
            return lr * (0.2 * math.sqrt(max(rows, columns)))
        return lr * math.sqrt(max(1, rows / columns))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, self.newton_schulz_dtype)
                parameter.mul_(1 - lr * group["weight_decay"])
                parameter.add_(update, alpha=-self.adjusted_lr(lr, parameter.shape))
        return loss
