"""LoRA layers (https://arxiv.org/abs/2106.09685) and loading an adapter onto a model: what inference needs.

`LoRALinear` holds a low-rank update beside a frozen projection (`q_proj`, ..., `down_proj`);
`add_lora_layers` freezes a model and wraps its chosen projections in it; `merge_lora` folds the update
back into plain `nn.Linear` weights, so a merged model saves, exports and generates like any other.
`load_adapter` reads an adapter in the files and tensor names Hugging Face `peft` uses (`peft` itself
is not needed). Starting a training run with adapters and saving them is `train/lora.py`'s business.
This module knows module names and shapes, not which model family it wraps, objectives or the training
loop; the output layer is deliberately not a target (it may be tied to the embedding, and objectives read
`lm_head.weight` directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import option
from lmforge.errors import UserError
from lmforge.models import require_finite
from lmforge.run_folder import RunFolder, read_json

# Short target names (what recipes and the CLI say) -> the module attribute names of `models/layers.py`.
TARGET_MODULES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# peft wraps the model as `PeftModel.base_model` (a LoraModel) whose `.model` is the wrapped module.
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = option(0, "LoRA rank (0 = off: train every weight)")
    alpha: float = option(16.0, "LoRA scale numerator: updates are scaled by alpha / rank")
    dropout: float = option(0.0, "dropout on the LoRA input")
    targets: str = option("q,k,v,o", "comma-separated short names: q,k,v,o (attention), gate,up,down (feed-forward)")

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, not {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), not {self.dropout}")
        names = self.target_names()
        unknown = [name for name in names if name not in TARGET_MODULES]
        if unknown:
            raise ValueError(f"lora.targets: unknown {', '.join(unknown)}; valid names: {', '.join(TARGET_MODULES)}")
        if not names:
            raise ValueError(f"lora.targets names no module; valid names: {', '.join(TARGET_MODULES)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def target_names(self) -> list[str]:
        names = [name.strip() for name in self.targets.split(",") if name.strip()]
        return list(dict.fromkeys(names))  # "q,q" means "q": drop repeats, keep the order

    def module_names(self) -> list[str]:
        """The attribute names to wrap, e.g. "q,v" -> ["q_proj", "v_proj"]."""
        return [TARGET_MODULES[name] for name in self.target_names()]


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha/r) * B(A(dropout(x)))  (https://arxiv.org/abs/2106.09685)

    The frozen base `weight` and `bias` are this module's own parameters, so the
    base keeps its state-dict names (`...q_proj.weight`) and only `lora_A` /
    `lora_B` are added beside them. B starts at zero: a freshly wrapped model
    computes exactly what the base computed.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, not {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.scale = alpha / rank
        # The very Parameter objects of the base: no copy, and a weight shared elsewhere stays shared.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # NOTE: peft uses Identity when dropout is 0, which keeps the state dict and the numbers the same.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)  # weight (out, r)
        # Kaiming-uniform A (the paper's "random Gaussian" in peft's form) and zero B: the update starts at zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out); the rank-r path costs r * (in + out) per token, beside in * out for the base.
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, (out, in), in the base weight's dtype."""
        # NOTE: the product is formed in float32, so merging a bf16 model rounds once, not twice.
        update = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        return (self.weight.float() + self.scale * update).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{dotted module name: LoRALinear} in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Linear]:
    """The linear layers `apply_lora` would wrap: attribute name in the config's module names."""
    wanted = set(config.module_names())
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in wanted
    }


def require_no_lora(model: nn.Module) -> None:
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora it before applying LoRA again")


def add_lora_layers(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, replace each nn.Linear whose attribute name is in
    config.module_names() by a LoRALinear around it (only its A and B train); return the dotted names replaced."""
    require_no_lora(model)
    targets = lora_targets(model, config)
    if not targets:
        linears = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        raise UserError(
            f"lora.targets {config.targets!r} ({', '.join(config.module_names())}) matches no linear layer; "
            f"this model's linear layers are named: {', '.join(sorted(linears)) or '(none)'}"
        )
    model.requires_grad_(False)
    for name, linear in targets.items():
        model.set_submodule(name, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    return list(targets)


def merge_lora(model: nn.Module) -> None:
    """In place: replace every LoRALinear by a plain nn.Linear holding the merged weight (same dtype/device);
    afterwards all parameters require grad again."""
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            # Built on the meta device: its own random init would be thrown away at once.
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = nn.Parameter(layer.merged_weight())
            linear.bias = layer.bias
            model.set_submodule(name, linear)
    model.requires_grad_(True)


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    """adapter_config.json -> LoRAConfig; UserError for anything this LoRA cannot reproduce."""
    path = RunFolder(folder).adapter_config
    values = read_json(path)
    peft_type = values.get("peft_type") if isinstance(values, dict) else None
    if peft_type != "LORA":
        raise UserError(f"{path} is not a LoRA adapter config (peft_type {peft_type!r}, want 'LORA')")
    for key, supported in (("bias", "none"), ("fan_in_fan_out", False), ("use_rslora", False)):
        if values.get(key, supported) != supported:
            raise UserError(f"{path}: {key} {values[key]!r} is not supported (only {supported!r})")
    modules = values.get("target_modules")
    if not isinstance(modules, list):
        raise UserError(f"{path}: target_modules must be a list of names like q_proj, not {modules!r}")
    short_names = {module: short for short, module in TARGET_MODULES.items()}
    unknown = [module for module in modules if module not in short_names]
    if unknown:
        raise UserError(f"{path}: unknown target_modules {unknown}; known: {', '.join(short_names)}")
    try:
        return LoRAConfig(
            rank=int(values["r"]),
            alpha=float(values["lora_alpha"]),
            dropout=float(values.get("lora_dropout", 0.0)),
            targets=",".join(short_names[module] for module in modules),
        )
    except KeyError as error:
        raise UserError(f"{path} has no {error.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise UserError(f"{path}: {error}") from None


def load_adapter(folder: str | Path, model: nn.Module, verify: bool = True) -> LoRAConfig:
    """Read the adapter config, wrap `model`'s layers in LoRALinear as it says and load the adapter tensors.

    Everything is checked before `model` is touched: a missing file or a tensor that does not fit
    (missing, unexpected, wrong shape; named in the error) leaves the model as it was.
    """
    require_no_lora(model)
    weights = RunFolder(folder).adapter_weights
    config = read_adapter_config(folder)
    tensors = RunFolder(folder).read_adapter_weights(verify=verify)
    require_finite(tensors, str(weights))
    expected = {}
    for name, linear in lora_targets(model, config).items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.rank, linear.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, config.rank)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    wrong_shape = [
        f"{name} {tuple(tensors[name].shape)} (want {shape})"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if missing or unexpected or wrong_shape:
        raise UserError(
            f"{weights} does not fit this model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}"
        )
    add_lora_layers(model, config)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return config
