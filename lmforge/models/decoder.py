"""Decoder-only language model in the Llama style: RMSNorm, rotary positions, SwiGLU, optional GQA and q/k/v biases.

Weight names match Hugging Face's `LlamaForCausalLM` with the `model.` prefix
dropped, so its state dict loads with a rename and our logits match its logits.
This module knows the network, not tokenizers, training or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import option, require_divisible, require_positive
from lmforge.models.cache import KVCache, StaticKVCache
from lmforge.models.layers import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    attention_mask_for,
    packed_attention,
    position_ids_for,
)
from lmforge.models.linear_cross_entropy import linear_cross_entropy


@dataclass
class DecoderConfig:
    vocab_size: int = option(8192, "tokens in the vocabulary (set from the tokenizer when training)")
    hidden_size: int = option(256, "width of the residual stream")
    num_layers: int = option(6, "transformer blocks")
    num_heads: int = option(4, "attention heads")
    num_kv_heads: int | None = option(None, "key/value heads for grouped-query attention (default: num_heads)")
    intermediate_size: int = option(704, "SwiGLU hidden width")
    max_position_embeddings: int = option(512, "longest sequence the model can see")
    rope_theta: float = option(10000.0, "rotary base frequency")
    rms_norm_eps: float = option(1e-5, "RMSNorm epsilon")
    tie_word_embeddings: bool = option(True, "share the input embedding and the output layer")
    qkv_bias: bool = option(False, "biases on the query, key and value projections (Qwen2 has them)")
    initializer_range: float = option(0.02, "std of the normal weight init")

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:  # plain multi-head attention: one key/value head per query head
            self.num_kv_heads = self.num_heads
        require_positive(
            self,
            ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
            + ("max_position_embeddings", "rope_theta", "rms_norm_eps"),
        )
        require_divisible(self, "hidden_size", "num_heads")
        # GQA (https://arxiv.org/abs/2305.13245): each key/value head serves num_heads / num_kv_heads query heads.
        require_divisible(self, "num_heads", "num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads, qkv_bias=config.qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rotary, mask, is_causal, cache, layer_index):
        # x: (B, T, hidden) throughout; normalising the branch input, not the residual stream, is what keeps
        # deep pre-norm stacks trainable without warm-up tricks (https://arxiv.org/abs/2002.04745).
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, is_causal, cache, layer_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab): embed, `num_layers` blocks, final norm, output layer."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # weight (vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # pre-norm blocks leave the stream unnormalised
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # weight (vocab, hidden)
        # One cos/sin table for all layers (no parameters): positions enter only through the rotation of q and k.
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            # One (vocab, hidden) matrix for input and output (https://arxiv.org/abs/1608.05859): for a small model
            # the embedding is a large share of all parameters.
            self.lm_head.weight = self.embed_tokens.weight
        # NOTE: GPT-2's scaled init (https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
        # for the projections that write into the residual stream keeps its variance flat with depth.
        for layer in self.layers:
            for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(projection.weight, std=config.initializer_range / (2 * config.num_layers) ** 0.5)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters stored once in a checkpoint: {copy name: source name}."""
        return {"lm_head.weight": "embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())  # tied weights count once

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        # Keys and values per layer, (B, num_kv_heads, max_length, head_dim): GQA shrinks the cache, not just compute.
        config = self.config
        return KVCache(
            config.num_layers,
            batch_size,
            config.num_kv_heads,
            config.head_dim,
            max_length,
            device=self.embed_tokens.weight.device,
            dtype=dtype or self.embed_tokens.weight.dtype,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, hidden).

        attention_mask, if given, covers the cached positions too: (B, past + T), 1 = real token.
        segment_ids (B, T), for training on packed rows: attention stays within each document.
        """
        past_length = cache.length if cache is not None else 0
        length = input_ids.shape[1]
        if segment_ids is not None:
            # Packed rows: a block-diagonal causal mask, and positions restart at 0 in each document.
            mask, position_ids = packed_attention(segment_ids)
            is_causal = False
        else:
            # No padding: mask None and is_causal True, which lets SDPA pick its fused causal kernels.
            mask, is_causal = attention_mask_for(attention_mask, length, past_length)
            # Left-padded rows count positions from their first real token, so padding does not shift them.
            position_ids = position_ids_for(attention_mask, length, past_length, input_ids.device)  # (B, T) or (T,)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        self.rotary.ensure(past_length + length)
        rotary = self.rotary(position_ids, x.dtype)  # cos, sin: (B, T, 1, head_dim) or (T, 1, head_dim)
        for index, layer in enumerate(self.layers):
            x = layer(x, rotary, mask, is_causal, cache, index)  # (B, T, hidden)
        if cache is not None:
            cache.advance(length)  # after all layers: each wrote its keys and values at the same offset
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only` (prefill needs only the last position), or
        (N, vocab) at the N True positions of `logits_at` (B, T) (a reply's tokens, not its prompt's).

        With `targets` (B, T) (next-token ids, -100 = ignored): the mean cross-entropy instead, fused with
        the output layer so the (tokens x vocab) logits never exist in full. Training goes through forward,
        as DDP and FSDP need it to.
        """
        hidden = self.hidden_states(input_ids, attention_mask, cache, segment_ids)  # (B, T, hidden)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets)  # scalar
        if logits_at is not None:
            hidden = hidden[logits_at]  # (N, hidden)
        elif last_only:
            hidden = hidden[:, -1:]  # (B, 1, hidden): a long prompt's (T, vocab) logits would be thrown away
        return self.lm_head(hidden)  # (B, T or 1, vocab)

    def decode_step(self, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One new token per row over a static cache -> its logits (B, vocab); the shape `torch.compile` wants.

        input_ids (B, 1). The cache holds each row's position id and key mask in tensors, so every step is
        the same graph; the caller calls `cache.advance()` afterwards.
        """
        x = self.embed_tokens(input_ids)  # (B, 1, hidden)
        self.rotary.ensure(cache.max_length)
        # NOTE: positions count real tokens only; the clamp only ever touches a finished row that a compiled batch
        # carries to keep its shape (its output is never read), which would otherwise run off the rotary table.
        position_ids = cache.position_ids.clamp(max=self.config.max_position_embeddings - 1)  # (B, 1)
        rotary = self.rotary(position_ids, x.dtype)
        mask = cache.key_mask[:, None, None, :]  # (B, 1, 1, max_length): written, non-padding columns
        for index, layer in enumerate(self.layers):
            # NOTE: an explicit mask, never is_causal: the static cache holds unwritten columns past this step.
            x = layer(x, rotary, mask, False, cache, index)  # (B, 1, hidden)
        return self.lm_head(self.norm(x))[:, -1]  # (B, vocab)
