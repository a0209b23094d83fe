"""Quantized linear layers and loading a quantized run folder: int8 per output channel (optionally int8
activations too), int4 in groups; a bf16 cast.

`Int8Linear` and `Int4Linear` hold packed weights and their scales in place of an `nn.Linear`. A quantized
folder's config.json has a `quantization` entry (method, group size, the modules replaced);
`models.load_model` reads it and calls `prepare_quantized`, which swaps in empty quantized layers before the
weights load, so generate, chat, serve and eval load a quantized folder like any other. Making one from a float
model (`quantize_model`, `quantize_run`) is compress/quantize.py's business.

Formats (safetensors, per replaced module, beside its `bias` if it has one):
- int8: `qweight` int8 (out, in) and `scales` float32 (out,): W ~= qweight * scales[:, None],
  symmetric, scale = max |W[row]| / 127.
- int4: `qweight` uint8 (out, in / 2), two values u in 0..15 per byte (column 2j in the low nibble,
  2j + 1 in the high one), and `scales`, `offsets` float16 (out, in / group_size):
  W ~= u * scale + offset per group of `group_size` inputs (offset = the group's minimum).
A tied output layer (the decoder's `lm_head`) is stored once, quantized; its embedding is rebuilt
from it at load time (dequantized into a float `nn.Embedding`: a lookup reads one row per token).

Layers compute in float. Decoding (a few rows at a time) uses PyTorch's CPU weight-only kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`), which read the small weights
and multiply in bf16; more rows (prefill, perplexity) dequantize the weight once and call
`F.linear`, faster there. `int8-dynamic` (same file) also quantizes activations, per call, and
multiplies int8 by int8 in fbgemm (`quantized::linear_dynamic`, what the deprecated
`quantize_dynamic` calls): the fastest at every row count but one tiny layer at batch 1. Per-row
activation scales through `torch._int_mm` measured slower: the extra elementwise passes cost more
than the int8 product saves. Numbers: `python bench/compress.py --kernels`.
This module knows linear layers and tensors, not tokenizers, run folders or which model family it is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.models.layers import few_rows_linear, few_rows_on_cpu

METHODS = {
    "int8": "int8 weights, one scale per output channel (4x smaller linear layers)",
    "int8-dynamic": "int8 weights as int8, activations quantized to int8 on the fly (CPU: faster for batches)",
    "int4": "int4 weights, a scale and an offset per group of inputs (about 6x smaller)",
    "bf16": "every weight cast to bfloat16 (2x smaller; computes in bf16)",
}
# NOTE: at most this many rows go through the packed CPU kernels. They work row by row, so their cost grows
# with the rows; from about 16-32 rows on, dequantizing once and calling F.linear is faster (measured).
KERNEL_MAX_ROWS = 16
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 and one float scale per output channel (W ~= qweight * scales).

    With `dynamic_activations`, CPU calls also quantize x to int8 (one scale per call, 7 bits, the way
    `torch.ao.quantization.quantize_dynamic` does) and multiply int8 by int8 in fbgemm: faster for batches,
    but a row's result then depends slightly on the other rows of its batch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dynamic_activations: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dynamic_activations = dynamic_activations
        self.dynamic_weight = None  # fbgemm's packed copy of qweight (an opaque object, not a tensor)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # NOTE: the kernel reads its rows 16 inputs at a time and misreads (or crashes) otherwise.
        self.use_kernel = in_features % 16 == 0
        self.register_buffer("kernel_scales", torch.ones(out_features, dtype=torch.bfloat16), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare_kernel())

    @classmethod
    def from_linear(cls, linear: nn.Linear, dynamic_activations: bool = False) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dynamic_activations)
        weight = linear.weight.detach().float().cpu()  # (out, in)
        absolute_max = weight.abs().amax(dim=1)  # (out,)
        scales = torch.where(absolute_max > 0, absolute_max / 127, torch.ones_like(absolute_max))
        layer.qweight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        layer.prepare_kernel()
        return layer.to(linear.weight.device)

    def prepare_kernel(self) -> None:
        self.kernel_scales = self.scales.to(torch.bfloat16)
        if self.dynamic_activations and self.use_kernel and self.qweight.device.type == "cpu":
            self.dynamic_weight = _fbgemm_weight(self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) these int8 values stand for."""
        # NOTE: convert, then scale in place: an out-of-place int8 x float broadcast is ~10x slower on CPU.
        return self.qweight.to(dtype).mul_(self.scales[:, None].to(dtype))

    @property
    def weight(self) -> torch.Tensor:
        # For code that reads `.weight` directly (the fused output layer + cross-entropy of training losses).
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        on_cpu = x.device.type == "cpu" and x.dtype == torch.float32
        if torch.compiler.is_compiling() and few_rows_on_cpu(x) and self.dynamic_weight is None:
            # A compiled decoding step reads the int8 weights in one loop (generate/compiled.py), with x and the
            # scales rounded to bf16 where the eager kernel rounds them, so both give the same tokens.
            scales = self.kernel_scales.float() if self.use_kernel else self.scales
            x_used = x.to(torch.bfloat16).float() if self.use_kernel else x.float()
            out = few_rows_linear(x_used, self.qweight) * scales
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.dynamic_weight is not None and on_cpu:
            flat = x.reshape(rows, self.in_features)  # (rows, in)
            out = torch.ops.quantized.linear_dynamic(flat, self.dynamic_weight, True)  # (rows, out)
        elif rows <= KERNEL_MAX_ROWS and self.use_kernel and on_cpu:
            # NOTE: the kernel multiplies in bf16 (x and the scales rounded to bf16): ~0.3% relative error per
            # output, the size of the int8 rounding itself; perplexity moves by < 0.1% (bench/compress.py).
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (rows, in)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.kernel_scales).to(x.dtype)
        else:
            return F.linear(x, self.dequantize(x.dtype), self.bias)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        dynamic = ", dynamic int8 activations" if self.dynamic_activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8{dynamic}"


def _fbgemm_weight(qweight: torch.Tensor, scales: torch.Tensor):
    """qweight and scales packed for `quantized::linear_dynamic`, or None where this PyTorch lacks it."""
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():
            # NOTE: PyTorch deprecates quantized tensors (it points to torchao); they are only the way into
            # fbgemm's prepacked weight here. Without them (a future PyTorch), int8 falls back to weight-only.
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(weight, None)
    except (AttributeError, RuntimeError):
        return None


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """(rows, columns) integers in 0..15 -> (rows, columns / 2) uint8: column 2j low nibble, 2j + 1 high."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (rows, columns / 2) uint8 -> (rows, columns) uint8 in 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit values, two per byte, and a float16 scale and offset per group.

    Group-wise affine quantization (as in llama.cpp's q4_1 or MLX): within each run of `group_size`
    inputs of one output channel, W ~= u * scale + offset with u in 0..15.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False) -> None:
        super().__init__()
        if group_size < 2 or group_size % 2 or in_features % group_size:
            raise ValueError(f"int4 group size {group_size} must be even and divide the {in_features} inputs")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.use_kernel = group_size in INT4_KERNEL_GROUP_SIZES and out_features % 16 == 0
        # The kernel's own tiled layout of the same values, rebuilt whenever the weights are loaded.
        self.register_buffer("kernel_weight", torch.zeros(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("kernel_scales_and_zeros", torch.zeros(0, dtype=torch.bfloat16), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare_kernel())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None)
        groups = linear.in_features // group_size
        weight = linear.weight.detach().float().cpu().view(linear.out_features, groups, group_size)
        minimum, maximum = weight.amin(dim=-1), weight.amax(dim=-1)  # (out, groups)
        # Rounded to their stored precision first, so the 4-bit values are chosen for the scales actually kept.
        scales = ((maximum - minimum) / 15).to(torch.float16)
        offsets = minimum.to(torch.float16)
        safe_scales = torch.where(scales > 0, scales.float(), torch.ones_like(minimum))
        values = torch.round((weight - offsets.float()[..., None]) / safe_scales[..., None]).clamp(0, 15)
        layer.qweight.copy_(pack_int4(values.view(linear.out_features, linear.in_features)))
        layer.scales.copy_(scales)
        layer.offsets.copy_(offsets)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        layer.prepare_kernel()
        return layer.to(linear.weight.device)

    def prepare_kernel(self) -> None:
        if not self.use_kernel or self.qweight.device.type != "cpu":
            return
        values = unpack_int4(self.qweight).to(torch.int32)  # (out, in)
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        # The kernel computes (u - 8) * scale + zero, so zero = offset + 8 * scale; shape (groups, out, 2).
        scales, offsets = self.scales.float(), self.offsets.float()
        pairs = torch.stack((scales, offsets + 8 * scales), dim=-1)  # (out, groups, 2)
        self.kernel_scales_and_zeros = pairs.transpose(0, 1).contiguous().to(torch.bfloat16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) these 4-bit values stand for."""
        groups = self.in_features // self.group_size
        # Unpacked straight into float and scaled in place: several times faster than unpack_int4, then scale.
        weight = torch.empty(self.out_features, self.in_features // 2, 2, device=self.qweight.device)
        weight[..., 0] = self.qweight & 0x0F
        weight[..., 1] = self.qweight >> 4
        weight = weight.view(self.out_features, groups, self.group_size)
        weight.mul_(self.scales.float()[..., None]).add_(self.offsets.float()[..., None])
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows > KERNEL_MAX_ROWS or not self.use_kernel or x.device.type != "cpu" or not self.kernel_weight.numel():
            return F.linear(x, self.dequantize(x.dtype), self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (rows, in)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros
        )  # (rows, out), bf16
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


QuantLinear = Int8Linear | Int4Linear


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (Int8Linear, Int4Linear))}


def tied_embeddings(model: nn.Module, modules: Sequence[str]) -> dict[str, str]:
    """{quantized module: the embedding weight it is tied to}: stored once, as the quantized layer."""
    tied = model.tied_weights
    return {name: tied[f"{name}.weight"] for name in modules if f"{name}.weight" in tied}


def _empty_layer(method: str, linear: nn.Linear, group_size: int | None) -> QuantLinear:
    bias = linear.bias is not None
    if method == "int4":
        return Int4Linear(linear.in_features, linear.out_features, group_size or 0, bias)
    return Int8Linear(linear.in_features, linear.out_features, bias, dynamic_activations=method == "int8-dynamic")


def prepare_quantized(
    model: nn.Module, entry: dict, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Rebuild the layers config.json's `quantization` entry names; the tensors to load into `model` then.

    Embeddings tied to a quantized layer are not stored: they are added, dequantized from that layer.
    """
    method = entry.get("method") if isinstance(entry, dict) else None
    if method not in METHODS:
        raise UserError(f"{where}/config.json: unknown quantization method {method!r}; known: {', '.join(METHODS)}")
    if method == "bf16":
        model.to(torch.bfloat16)
        return tensors
    modules = entry.get("modules") or []
    tensors = dict(tensors)
    try:
        for name in modules:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise UserError(f"{where}/config.json: quantized module {name} is not a linear layer of this model")
            model.set_submodule(name, _empty_layer(method, linear, entry.get("group_size")))
    except AttributeError:
        raise UserError(f"{where}/config.json names quantized modules this model does not have") from None
    except ValueError as error:
        raise UserError(f"{where}/config.json: {error}") from None
    for name, source in tied_embeddings(model, modules).items():
        if source not in tensors:
            layer = model.get_submodule(name)
            layer_state = {key.removeprefix(f"{name}."): value for key, value in tensors.items()
                           if key.startswith(f"{name}.")}  # fmt: skip
            layer.load_state_dict(layer_state, strict=False)
            tensors[source] = layer.dequantize()
    return tensors
