"""Encoder-decoder Transformer (https://arxiv.org/abs/1706.03762) with post-LayerNorm blocks, as in BART/T5 setups.

The encoder is our BERT-style `Encoder` with no head; the decoder adds causal
self-attention over a `KVCache` and cross-attention over the encoder's output,
whose keys and values are projected once per source (`cross_kv`). One token
embedding feeds both sides and is tied to the output layer.

Targets follow one convention: decoder input = [bos] + target, labels = target +
[eos]; sources and targets are right-padded. This module knows the network, not
tokenizers, training or search (`lmforge.generate.seq2seq_search`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmforge.config import option, require_divisible, require_positive
from lmforge.models.cache import KVCache
from lmforge.models.encoder import Embeddings, Encoder, EncoderConfig, require_learnable_positions
from lmforge.models.layers import (
    Attention,
    GELUFeedForward,
    RotaryEmbedding,
    attention_mask_for,
    padding_mask_for,
)

# Per decoder layer: key, value (B, H, S, head_dim); with `copy`, one more pair last: the pointer's keys (B, S, hidden)
# and the source ids (B, S). Every entry is indexed by batch row, so search code reorders them all alike.
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Seq2SeqConfig:
    vocab_size: int = option(8192, "tokens in the vocabulary (set from the tokenizer when training)")
    hidden_size: int = option(256, "width of the residual stream")
    num_encoder_layers: int = option(3, "encoder blocks")
    num_decoder_layers: int = option(3, "decoder blocks")
    num_heads: int = option(4, "attention heads")
    intermediate_size: int = option(1024, "feed-forward hidden width")
    max_position_embeddings: int = option(256, "longest source, and longest target including bos")
    position: Literal["learned", "rotary"] = option("learned", "learned position embeddings or rotary")
    rope_theta: float = option(10000.0, "rotary base frequency")
    layer_norm_eps: float = option(1e-5, "LayerNorm epsilon")
    dropout: float = option(0.1, "dropout on embeddings, attention outputs and feed-forward outputs")
    initializer_range: float = option(0.02, "std of the normal weight init")
    norm: Literal["post", "pre"] = option("pre", "pre-norm blocks (trains fast from scratch) or post-norm (original)")
    copy: bool = option(False, "pointer-generator: mix the vocabulary with attention over the source tokens")

    def __post_init__(self) -> None:
        require_positive(
            self,
            (
                "vocab_size",
                "hidden_size",
                "num_encoder_layers",
                "num_decoder_layers",
                "num_heads",
                "intermediate_size",
                "max_position_embeddings",
            ),
        )
        require_divisible(self, "hidden_size", "num_heads")
        require_learnable_positions(self)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), not {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def encoder_config(self) -> EncoderConfig:
        """The encoder side as an `EncoderConfig`: no segment embeddings, no head."""
        return EncoderConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_encoder_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            position=self.position,
            rope_theta=self.rope_theta,
            type_vocab_size=0,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            initializer_range=self.initializer_range,
            head="none",
            norm=self.norm,
        )


class Seq2SeqDecoderLayer(nn.Module):
    """Post-norm block: norm(x + causal self-attn(x)), norm(x + cross-attn(x, memory)), norm(x + mlp(x)).

    Pre-norm (`norm="pre"`, the default): x + sublayer(norm(x)) for each of the three sublayers.
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.self_attn = Attention(config.hidden_size, config.num_heads, bias=True)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = Attention(config.hidden_size, config.num_heads, bias=True)
        self.cross_attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GELUFeedForward(config.hidden_size, config.intermediate_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, mask, is_causal, cache, layer_index, context_kv, source_mask) -> torch.Tensor:
        # x: (B, T, hidden) in and out; context_kv: this layer's source keys and values, each (B, H, S, head_dim).
        # NOTE: no rotation in cross-attention: a target position relative to a source position means nothing.
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.attention_norm(x), rotary, mask, is_causal, cache, layer_index))
            x = x + self.dropout(
                self.cross_attn(self.cross_attention_norm(x), None, source_mask, context_kv=context_kv)
            )
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(self.self_attn(x, rotary, mask, is_causal, cache, layer_index)))
        cross = self.cross_attn(x, None, source_mask, context_kv=context_kv)
        x = self.cross_attention_norm(x + self.dropout(cross))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Seq2Seq(nn.Module):
    """Source ids (B, S) -> memory (B, S, hidden) once; decoder ids (B, T) over that memory -> logits (B, T, vocab)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        encoder_config = config.encoder_config()
        self.encoder = Encoder(encoder_config)
        # NOTE: as in BART, the decoder has its own position table and embedding LayerNorm; only tokens are shared.
        self.decoder_embeddings = Embeddings(encoder_config)
        self.decoder_layers = nn.ModuleList(Seq2SeqDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.decoder_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm == "pre" else None
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Pointer-generator (See et al., https://arxiv.org/abs/1704.04368): a summary copies most of its words
        # from the source, which a small model trained briefly cannot learn to spell through the vocabulary.
        self.copy_keys = nn.Linear(config.hidden_size, config.hidden_size) if config.copy else None
        self.copy_gate = nn.Linear(config.hidden_size, 1) if config.copy else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
            if config.position == "rotary"
            else None
        )
        self.apply(self._init_weights)
        # One (vocab, hidden) table for source tokens, target tokens and the output layer: both sides share a
        # tokenizer, and the tied output layer is what lets a source word's vector predict that word.
        shared = self.encoder.embeddings.word_embeddings.weight
        self.decoder_embeddings.word_embeddings.weight = shared
        self.lm_head.weight = shared

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters stored once in a checkpoint: {copy name: source name}."""
        source = "encoder.embeddings.word_embeddings.weight"
        return {"decoder_embeddings.word_embeddings.weight": source, "lm_head.weight": source}

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())  # tied weights count once

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        """Cache for the decoder's self-attention; cross-attention keys and values come from `cross_kv`."""
        # (B, num_heads, max_length, head_dim) per decoder layer: no grouped-query attention on this side.
        weight = self.lm_head.weight
        config = self.config
        return KVCache(
            config.num_decoder_layers,
            batch_size,
            config.num_heads,
            config.head_dim,
            max_length,
            device=weight.device,
            dtype=dtype or weight.dtype,
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded source ids (B, S), mask (B, S) with 1 = real token -> memory (B, S, hidden)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"a source of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        return self.encoder(input_ids, attention_mask)

    def cross_kv(self, memory: torch.Tensor, source_ids: torch.Tensor | None = None) -> CrossKV:
        """Each decoder layer's cross-attention keys and values of `memory`, computed once per source."""
        # Projected once, not at every decoding step: the source does not change while the target grows.
        # Per layer: keys and values, each (B, H, S, head_dim).
        memory_kv = [layer.cross_attn.project_context(memory) for layer in self.decoder_layers]
        if self.copy_keys is not None:
            if source_ids is None:
                raise ValueError("a copying model needs the source ids: cross_kv(memory, source_ids)")
            memory_kv.append((self.copy_keys(memory), source_ids))
        return memory_kv

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory_kv: CrossKV,
        source_mask: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decoder input ids (B, T) -> logits (B, T, vocab).

        source_mask (B, S) marks real source tokens; decoder_attention_mask, if
        given, covers the cached positions too: (B, past + T). Targets are
        right-padded, so positions simply continue from the cache.
        """
        past_length = cache.length if cache is not None else 0
        length = decoder_input_ids.shape[1]
        if past_length + length > self.config.max_position_embeddings:
            raise ValueError(
                f"a target of {past_length + length} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        mask, is_causal = attention_mask_for(decoder_attention_mask, length, past_length)
        cross_mask = padding_mask_for(source_mask)  # (B, 1, 1, S)
        # Right-padded targets: every row's positions are the same, so one (T,) range serves the batch.
        position_ids = torch.arange(past_length, past_length + length, device=decoder_input_ids.device)  # (T,)
        x = self.decoder_embeddings(decoder_input_ids, position_ids)  # (B, T, hidden)
        rotary = None
        if self.rotary is not None:
            self.rotary.ensure(past_length + length)
            rotary = self.rotary(position_ids, x.dtype)
        for index, layer in enumerate(self.decoder_layers):
            x = layer(x, rotary, mask, is_causal, cache, index, memory_kv[index], cross_mask)  # (B, T, hidden)
        if cache is not None:
            cache.advance(length)  # after all layers: each wrote its keys and values at the same offset
        hidden = self.decoder_norm(x) if self.decoder_norm is not None else x
        logits = self.lm_head(hidden)  # (B, T, vocab)
        if self.copy_keys is None:
            return logits
        return self._copy_log_probs(hidden, logits, memory_kv[-1], source_mask)

    def _copy_log_probs(self, hidden, logits, pointer, source_mask) -> torch.Tensor:
        """log(g * P_vocab + (1 - g) * attention mass on each source token's id): (B, T, vocab).

        Log-probabilities are valid logits (their log-softmax is themselves), so losses and search are unchanged.
        """
        keys, source_ids = pointer  # (B, S, hidden), (B, S)
        scores = hidden @ keys.transpose(1, 2) / hidden.shape[-1] ** 0.5  # (B, T, S)
        if source_mask is not None:
            scores = scores.masked_fill(~source_mask[:, None, :].bool(), float("-inf"))  # padding is never copied
        # In float32 whatever the autocast: the mixture is summed in probability space, where bf16 loses small terms.
        attention = scores.float().softmax(dim=-1)  # (B, T, S)
        generate = torch.sigmoid(self.copy_gate(hidden).float())  # (B, T, 1): g, the share of the vocabulary
        probabilities = logits.float().softmax(dim=-1) * generate  # (B, T, vocab)
        # A source token's attention goes to its id; a word appearing twice in the source collects both shares.
        ids = source_ids[:, None, :].expand(-1, hidden.shape[1], -1)  # (B, T, S)
        probabilities = probabilities.scatter_add(-1, ids, attention * (1 - generate))
        return probabilities.clamp_min(1e-20).log()  # floor: a zero probability would give -inf and NaN gradients

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing: source (B, S) and decoder input [bos] + target (B, T) -> logits (B, T, vocab)."""
        memory_kv = self.cross_kv(self.encode(input_ids, attention_mask), input_ids)
        return self.decode(decoder_input_ids, memory_kv, attention_mask, decoder_attention_mask)
