"""Building blocks shared by every model family: norms, rotary positions, attention, feed-forward, few-row products.

Each block is a small `nn.Module` whose weight names follow Hugging Face's Llama
names (`q_proj`, `gate_proj`, ...), so importing and exporting weights is a
near-identity map. This module knows tensors and shapes, not tokens, configs or
training: a family file (`decoder.py`, ...) picks the blocks and wires them. The KV cache
that attention writes into is `cache.py`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.cache import KVCache, StaticKVCache


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (https://arxiv.org/abs/1910.07467), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: F.rms_norm is one fused kernel; upcasting first keeps bf16 runs as exact as Llama's.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, https://arxiv.org/abs/2104.09864), Llama's half-split layout.

    cos/sin are tabulated for the positions used so far (`ensure` grows the tables, at most to
    `max_positions`), so a config that claims 10^9 positions costs nothing until they are used;
    lookups by position id make left-padded batches and cached decoding use the same code.
    """

    INITIAL_POSITIONS = 4096  # tabulated at build time; longer sequences grow the tables by doubling

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        cos, sin = self._tables(min(max_positions, self.INITIAL_POSITIONS), None)
        self.register_buffer("cos", cos, persistent=False)  # (positions, head_dim)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, positions: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Always computed in float32 (a bf16 model's buffers are bf16; its frequencies would be too coarse).
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        angles = torch.outer(torch.arange(positions, dtype=torch.float, device=device), 1.0 / self.theta**exponents)
        # NOTE: sin carries the sign of Llama's rotate_half, so rotating is one roll instead of split, negate, concat.
        return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-angles, angles), dim=-1).sin()

    def ensure(self, positions: int) -> None:
        """Make the tables cover positions 0 .. `positions` - 1 (callers pass a Python bound, never a tensor).

        A symbolic size (torch.export tracing) changes nothing: exporters call `ensure` first with the full context.
        """
        if not isinstance(positions, int) or positions <= self.cos.shape[0] or self.cos.shape[0] >= self.max_positions:
            return
        grown = min(self.max_positions, max(positions, 2 * self.cos.shape[0]))
        cos, sin = self._tables(grown, self.cos.device)
        self.cos, self.sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) or (T,) -> cos, sin: (B, T, 1, head_dim) broadcasting over heads
        cos = self.cos[position_ids].unsqueeze(-2).to(dtype)
        sin = self.sin[position_ids].unsqueeze(-2).to(dtype)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, heads, head_dim); pairs (i, i + head_dim/2) rotate together, as in Llama.
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# NOTE: on a CPU, with at most FEW_ROWS rows, a product with a weight matrix is a matrix-vector product, bound by
# reading the weights, and BLAS's matrix-vector kernels read them at about 8 GB/s on our AMD EPYC while a copy runs
# at 49. Written as a multiply and a sum over the inputs, inductor turns it into one vectorised loop that reads each
# weight once, at 28-40 GB/s. Compiled decoding steps (generate/compiled.py) and the int8 layers use it; from
# 8 rows on BLAS is as fast or faster.
FEW_ROWS = 4


def few_rows_on_cpu(x: torch.Tensor) -> bool:
    """Whether x (..., in) has at most FEW_ROWS rows and lives on a CPU (GPU BLAS reads weights at memory speed)."""
    return x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear as a multiply and a sum: x (..., in), weight (out, in) -> (..., out)."""
    out = (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out, in) -> (..., out)
    return out if bias is None else out + bias


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query key/value heads (https://arxiv.org/abs/2305.13245).

    Self-attention by default; cross-attention when `context_kv` (from
    `project_context` on the encoder's output) is given. The caller supplies the
    mask (causal, padding or both) or `is_causal=True` for the unpadded fast
    path, and `rotary=None` for models with learned positions. `bias` puts biases on all four
    projections (BERT); `qkv_bias` on the query, key and value projections only (Qwen2).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = False,
        qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        # A list while explain/attention.py records this layer's attention probabilities, None otherwise: SDPA never
        # materialises them, so recording computes them once more beside it and the normal path pays one check.
        self.recorded: list[torch.Tensor] | None = None

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an encoder output (B, S, hidden) -> 2 x (B, KV, S, D), computed once per input."""
        batch, length, _ = context.shape
        key = self.k_proj(context).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(context).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return key, value

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | StaticKVCache | None = None,
        layer_index: int = 0,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        query = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)  # (B, T, H, D)
        if rotary is not None:
            query = apply_rotary(query, *rotary)
        query = query.transpose(1, 2)  # (B, H, T, D)
        if context_kv is not None:
            key, value = context_kv  # (B, KV, S, D)
        else:
            key = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
            if rotary is not None:
                key = apply_rotary(key, *rotary)
            key = key.transpose(1, 2)  # (B, KV, T, D)
            value = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            # NOTE: no rotary on values: only query-key dot products carry relative positions.
            if cache is not None:
                key, value = cache.update(layer_index, key, value)  # (B, KV, S, D)
        if self.recorded is not None:
            self.recorded.append(attention_probabilities(query, key, mask, is_causal))
        # NOTE: enable_gqa lets SDPA read each key/value head for its group of query heads, without repeating it.
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) as SDPA computes it: query (B, H, T, D), key (B, KV, S, D) -> (B, H, T, S), float32.

    `mask` is SDPA's boolean mask (True = may attend), `is_causal` its causal flag (square, top-left aligned).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # (B, H, S, D): each query head's own keys
    scores = query.float() @ key.float().transpose(-1, -2) / query.shape[-1] ** 0.5  # (B, H, T, S)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()  # (T, S)
        scores = scores.masked_fill(~causal, -torch.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return scores.softmax(dim=-1)


class SwiGLU(nn.Module):
    """Gated feed-forward, down(silu(gate(x)) * up(x)) (https://arxiv.org/abs/2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, T, hidden) -> gate, up (B, T, intermediate) -> (B, T, hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUFeedForward(nn.Module):
    """BERT's and the original Transformer's feed-forward, down(gelu(up(x))), with biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))  # (B, T, hidden) -> (B, T, intermediate) -> (B, T, hidden)


def padding_mask_for(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) padding mask, 1 = real token -> a (B, 1, 1, S) boolean key mask for bidirectional or cross-attention."""
    if attention_mask is None:
        return None
    return attention_mask[:, None, None, :].bool()


def attention_mask_for(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int
) -> tuple[torch.Tensor | None, bool]:
    """Turn a (B, S) padding mask into what SDPA wants: (mask, is_causal).

    S = past_length + query_length. With no padding we avoid building a mask at
    all: `is_causal` for a fresh sequence, nothing for one new token over a cache.
    """
    if attention_mask is None:
        if past_length == 0:
            return None, query_length > 1
        if query_length == 1:
            return None, False
    total = past_length + query_length
    device = attention_mask.device if attention_mask is not None else None
    query_positions = torch.arange(past_length, total, device=device)[:, None]  # (T, 1)
    key_positions = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = (key_positions <= query_positions)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        # NOTE: a padding query would attend to nothing and SDPA would return NaN; letting it see
        # itself keeps the numbers finite. Its output is never read.
        allowed = allowed | (key_positions == query_positions)[None, None]
    return allowed, False


def position_ids_for(attention_mask: torch.Tensor | None, query_length: int, past_length: int, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row is positioned exactly as if unpadded."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return positions[:, past_length:].clamp(min=0)


def packed_attention(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Several documents packed in one row: (causal mask that never crosses a document, positions per document).

    segment_ids: (B, T), equal ids mark one document, consecutive; 0 marks padding.
    Returns a (B, 1, T, T) boolean mask and (B, T) position ids restarting at 0 in each document,
    so every document is computed exactly as if it were alone.
    """
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[None, :] <= index[:, None]  # (T, T)
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    mask = (same_document & causal)[:, None]  # (B, 1, T, T); a padding query still sees itself
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first_index = torch.cummax(torch.where(starts, index, 0), dim=1).values  # (B, T)
    return mask, index - first_index
