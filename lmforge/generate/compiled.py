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

On a CPU, with at most `FEW_ROWS` rows, every `F.linear` of a compiled step is written as a multiply and a
sum (`models.layers.few_rows_linear`, where the reason is measured): 3-4x faster at batch 1. Int8 layers do the
same on their int8 weights (compress/quantize.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lmforge.errors import UserError
from lmforge.models.cache import KVCache, StaticKVCache
from lmforge.models.decoder import Decoder
from lmforge.models.layers import few_rows_linear, few_rows_on_cpu

COMPILE_OPTIONS = {"max_autotune": True, "freezing": True, "cpp_wrapper": True}
LENGTH_MULTIPLE = 256  # cache lengths are rounded up to this, so a handful of graphs serve every prompt
# Graphs one process may compile for the decode step: one per model, batch size and cache length. Dynamo's default
# of 8 is one server's batch sizes 1-4 at two cache lengths; past the limit a fullgraph compile fails.
RECOMPILE_LIMIT = 64


def static_length(model: nn.Module, needed: int) -> int:
    """`needed` rounded up to a multiple of LENGTH_MULTIPLE, but no further than the context."""
    context = model.config.max_position_embeddings
    return max(needed, min(context, -(-needed // LENGTH_MULTIPLE) * LENGTH_MULTIPLE))


def check_compilable(model: nn.Module) -> None:
    if not isinstance(model, Decoder):
        raise UserError(f"compiled decoding needs a decoder; this is a {type(model).__name__}")


class _FewRowsLinearAsSums(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and few_rows_on_cpu(args[0]):
            return few_rows_linear(*args, **kwargs)
        return func(*args, **kwargs)


def _decode_step(model: Decoder, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    with _FewRowsLinearAsSums():
        return model.decode_step(tokens, cache)


def _compiled_step():
    # NOTE: a new wrapper per batch costs nothing: compiled graphs are cached on _decode_step's code, one per model,
    # batch size and cache length (torch._dynamo's guards tell them apart).
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)


class CompiledDecoding:
    """Compiled decode steps for one set of rows, over a static copy of their (prefilled) `cache`.

    `needed`: the most columns any step will use. `cache()` hands the rows back as a `KVCache`
    (to add or drop rows); a new `CompiledDecoding` then continues from it.
    """

    def __init__(self, model: Decoder, cache: KVCache, needed: int) -> None:
        check_compilable(model)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.model = model
        self.step = _compiled_step()
        self.static = cache.static(static_length(model, needed))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,), each row's newest token -> the next logits (B, vocab)."""
        try:
            logits = self.step(self.model, tokens[:, None], self.static)  # (B, vocab)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed) as error:
            reason = str(error).strip().splitlines()[0]
            raise UserError(
                f"this model's decoding step cannot be compiled ({reason}); decode without --compile"
            ) from None
        self.static.advance()
        return logits

    def cache(self, max_length: int) -> KVCache:
        return self.static.dynamic(max_length)
