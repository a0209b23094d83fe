"""Decoding steps compiled by `torch.compile` over a static KV cache.

At batch 1 a small model's eager step spends more time dispatching operators from Python than
multiplying: bench-small reads its 55 MB of weights in about 1.4 ms, but an eager step takes over
3 ms. A compiled step fuses the norms, rotary and residual adds into a few C++ loops, calls the
matrix products from a C++ wrapper (`cpp_wrapper`), treats the weights as constants (`freezing`,
which lets it pre-pack them) and times the candidate kernels once (`max_autotune`).

The price is a one-off compile (a minute for bench-small on 2 cores, less once inductor's disk
cache is warm) per model, batch size and cache length; cache lengths are rounded up to a multiple
of 256 so a few lengths serve every prompt. Frozen weights are read at compile time: a model
whose weights change afterwards needs a new `LM`. Prefill stays eager (it is one call per prompt).

On a CPU, with at most `FEW_ROWS` rows, a step is a matrix-vector product, bound by reading the weights, and BLAS's
matrix-vector kernels read them at about 8 GB/s here while a copy runs at 49. So in compiled steps every
`F.linear` with few rows is written as a multiply and a sum over the inputs, which inductor turns into one
vectorised loop, split over the threads, that reads each weight once: 28-40 GB/s, 3-4x faster at batch 1 (int8
layers do the same on their int8 weights, compress/quantize.py). From 8 rows on, BLAS is as fast or faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lmforge.errors import UserError
from lmforge.models.layers import KVCache, StaticKVCache

COMPILE_OPTIONS = {"max_autotune": True, "freezing": True, "cpp_wrapper": True}
LENGTH_MULTIPLE = 256  # cache lengths are rounded up to this, so a handful of graphs serve every prompt
FEW_ROWS = 4  # up to this many rows, products with the weights are sums (see above)


def static_length(model: nn.Module, needed: int) -> int:
    context = model.config.max_position_embeddings
    return min(context, -(-needed // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)


def check_compilable(model: nn.Module) -> None:
    if not hasattr(model, "decode_step"):
        raise UserError(f"compiled decoding needs a decoder; this is a {type(model).__name__}")


def few_rows_on_cpu(x: torch.Tensor) -> bool:
    # NOTE: measured on CPUs only; GPU BLAS reads weights at memory speed already.
    return x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear as a multiply and a sum: x (..., in), weight (out, in) -> (..., out)."""
    out = (x.unsqueeze(-2) * weight).sum(-1)
    return out if bias is None else out + bias


class _FewRowsLinearAsSums(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and few_rows_on_cpu(args[0]):
            return few_rows_linear(*args, **kwargs)
        return func(*args, **kwargs)


def _decode_step(model: nn.Module, *inputs) -> torch.Tensor:
    with _FewRowsLinearAsSums():
        return model.decode_step(*inputs)


def _compiled_step():
    # NOTE: a new wrapper per batch costs nothing: compiled graphs are cached on _decode_step's code, one per model,
    # batch size and cache length (torch._dynamo's guards tell them apart).
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)


class CompiledDecoding:
    """Decode steps for one batch of rows whose prompts `cache` holds (after an eager prefill).

    `attention_mask` (B, cache.length) marks the prompts' real tokens (None: no padding);
    `needed` is the most columns any step will use.
    """

    def __init__(self, model: nn.Module, cache: KVCache, attention_mask: torch.Tensor | None, needed: int) -> None:
        check_compilable(model)
        self.model = model
        self.step = _compiled_step()
        self.cache = StaticKVCache(cache, static_length(model, needed))
        batch, device = cache.keys.shape[1], cache.keys.device
        self.key_mask = torch.zeros(batch, self.cache.max_length, dtype=torch.bool, device=device)
        if attention_mask is None:
            self.key_mask[:, : cache.length] = True
            self.position_ids = torch.full((batch, 1), cache.length, device=device)
        else:
            self.key_mask[:, : cache.length] = attention_mask.bool()
            self.position_ids = attention_mask.sum(dim=1, keepdim=True)  # (B, 1) real tokens so far

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,), each row's newest token -> the next logits (B, vocab)."""
        self.key_mask.index_fill_(1, self.cache.column, True)
        try:
            logits = self.step(self.model, tokens[:, None], self.position_ids, self.key_mask, self.cache)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed) as error:
            reason = str(error).strip().splitlines()[0]
            raise UserError(
                f"this model's decoding step cannot be compiled ({reason}); decode without --compile"
            ) from None
        self.cache.column += 1
        self.position_ids += 1
        return logits
