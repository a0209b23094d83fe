"""BERT-style encoder: bidirectional attention over a padded batch, post-LayerNorm blocks, GELU, one task head.

The backbone is BERT's (https://arxiv.org/abs/1810.04805): word + position (+
segment) embeddings, then blocks of x = norm(x + attention(x)), x = norm(x +
mlp(x)). Positions are learned (BERT) or rotary. `config.head` picks what the
forward pass returns: hidden states, masked-LM logits, class logits, answer
span logits or per-token replaced-token logits (ELECTRA's discriminator,
`models/electra.py`). Embeddings narrower or wider than the blocks are projected
to their width, as in ELECTRA's generator. Hugging Face BERT weights map onto
these names one to one (`lmforge.models.bert`). This module knows the network,
not tokenizers or training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmforge.config import option, require_divisible, require_positive
from lmforge.models.layers import Attention, GELUFeedForward, RotaryEmbedding, padding_mask_for

Head = Literal["none", "mlm", "classify", "span", "replaced_token"]


@dataclass
class EncoderConfig:
    vocab_size: int = option(8192, "tokens in the vocabulary (set from the tokenizer when training)")
    hidden_size: int = option(256, "width of the residual stream")
    embedding_size: int = option(
        0, "width of the token/position/segment embeddings, projected to hidden_size (0 = hidden_size, no projection)"
    )
    num_layers: int = option(4, "transformer blocks")
    num_heads: int = option(4, "attention heads")
    intermediate_size: int = option(1024, "feed-forward hidden width")
    max_position_embeddings: int = option(512, "longest sequence the model can see")
    position: Literal["learned", "rotary"] = option("learned", "learned position embeddings (BERT) or rotary")
    rope_theta: float = option(10000.0, "rotary base frequency")
    type_vocab_size: int = option(2, "segment ids (sentence A / B); 0 = no segment embedding")
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon")
    dropout: float = option(0.1, "dropout on embeddings, attention output and feed-forward output")
    initializer_range: float = option(0.02, "std of the normal weight init")
    head: Head = option(
        "none", "none (hidden states), mlm, classify, span (extractive QA) or replaced_token (ELECTRA's discriminator)"
    )
    num_labels: int = option(2, "classes, for the classify head")
    pooling: Literal["cls", "mean"] = option("cls", "classify from the first token or the mean of real tokens")
    norm: Literal["post", "pre"] = option("post", "post-norm blocks (BERT) or pre-norm (easier to train from scratch)")

    def __post_init__(self) -> None:
        require_positive(
            self,
            ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_labels")
            + ("max_position_embeddings",),
        )
        require_divisible(self, "hidden_size", "num_heads")
        require_learnable_positions(self)
        if isinstance(self.embedding_size, bool) or not isinstance(self.embedding_size, int) or self.embedding_size < 0:
            raise ValueError(f"model.embedding_size must be 0 (= hidden_size) or positive, not {self.embedding_size!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size


# A learned position table is a weight allocated when the model is built; past this it is surely a typo.
MAX_LEARNED_POSITIONS = 1 << 20


def require_learnable_positions(config) -> None:
    if config.position == "learned" and config.max_position_embeddings > MAX_LEARNED_POSITIONS:
        raise ValueError(
            f"model.max_position_embeddings {config.max_position_embeddings} is too large for learned positions "
            f"(at most {MAX_LEARNED_POSITIONS:,}: the table is one weight row per position); use position: rotary"
        )


class Embeddings(nn.Module):
    """Token + learned position (+ segment) embeddings, then LayerNorm and dropout."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        width = config.embedding_width
        self.word_embeddings = nn.Embedding(config.vocab_size, width)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, width) if config.position == "learned" else None
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # (B, T, embedding width)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)  # (T, width), broadcast over the batch
        if self.token_type_embeddings is not None:
            # Sentence A / B ids (B, T); without them every token is sentence A, as in BERT.
            x = x + self.token_type_embeddings(
                token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            )
        return self.dropout(self.norm(x))


class EncoderLayer(nn.Module):
    """Post-norm block, as BERT and the original Transformer: norm(x + attn(x)), then norm(x + mlp(x)).

    With `norm="pre"`: x + attn(norm(x)), then x + mlp(norm(x)) (https://arxiv.org/abs/2002.04745), whose
    gradients stay well scaled from the first step, so small models trained from scratch learn much faster.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.self_attn = Attention(config.hidden_size, config.num_heads, bias=True)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GELUFeedForward(config.hidden_size, config.intermediate_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, hidden) in and out; mask (B, 1, 1, T) keeps padding keys out, no causal mask: every token
        # sees the whole sentence, which is what makes the encoder bidirectional.
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.attention_norm(x), rotary, mask))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(self.self_attn(x, rotary, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then the (tied) vocabulary projection with a bias.

    The dense layer maps to the embedding width, so the projection can be the token embeddings even where they are
    wider than the blocks (ELECTRA's generator predicts through its discriminator's embeddings).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_width)
        self.norm = nn.LayerNorm(config.embedding_width, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.embedding_width, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # (B, T, hidden) -> (B, T, vocab); `decoder` is BERT's name for this output projection, kept for its weights.
        return self.decoder(self.norm(nn.functional.gelu(self.dense(hidden))))


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head (Hugging Face's names): dense, GELU, then one logit per token, > 0 = replaced."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(nn.functional.gelu(self.dense(hidden))).squeeze(-1)  # (B, T, hidden) -> (B, T)


class ClassificationHead(nn.Module):
    """Pool the sequence (first token through BERT's tanh pooler, or the mean of real tokens), then classify."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.pooling = config.pooling
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, hidden)
        elif attention_mask is None:
            pooled = hidden.mean(dim=1)  # (B, hidden)
        else:
            # Padding must not dilute the mean: sum the real tokens only and divide by their count.
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, hidden)
        return self.classifier(self.dropout(torch.tanh(self.pooler(pooled))))  # (B, num_labels)


class Encoder(nn.Module):
    """Token ids (B, T) and a padding mask -> hidden states (B, T, hidden), then the one head `config.head` picks.

    `embeddings`, given, are another encoder's, shared rather than copied (ELECTRA's generator reads and predicts
    through its discriminator's); their width must be `config.embedding_width`.
    """

    def __init__(self, config: EncoderConfig, embeddings: Embeddings | None = None) -> None:
        super().__init__()
        self.config = config
        if embeddings is not None and embeddings.word_embeddings.embedding_dim != config.embedding_width:
            raise ValueError(
                f"shared embeddings are {embeddings.word_embeddings.embedding_dim} wide; "
                f"model.embedding_size says {config.embedding_width}"
            )
        self.embeddings = Embeddings(config) if embeddings is None else None
        width = config.embedding_width
        self.embeddings_project = nn.Linear(width, config.hidden_size) if width != config.hidden_size else None
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        # Pre-norm blocks leave the residual stream unnormalised; one LayerNorm closes it.
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm == "pre" else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
            if config.position == "rotary"
            else None
        )
        # The head is chosen here, once: forward then returns what the head that exists gives.
        self.mlm_head = MaskedLMHead(config) if config.head == "mlm" else None
        self.classification_head = ClassificationHead(config) if config.head == "classify" else None
        self.span_head = nn.Linear(config.hidden_size, 2) if config.head == "span" else None  # start, end logits
        self.replaced_token_head = ReplacedTokenHead(config) if config.head == "replaced_token" else None
        self.apply(self._init_weights)
        if embeddings is not None:
            self.embeddings = embeddings  # after the init: shared weights are their owner's to initialise
        if self.mlm_head is not None:
            # Tied as in BERT: predicting a token reuses the vector that embeds it.
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters stored once in a checkpoint: {copy name: source name}."""
        return {"mlm_head.decoder.weight": "embeddings.word_embeddings.weight"} if self.mlm_head is not None else {}

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) with 1 = real token -> last hidden states (B, T, hidden).

        Right padding is expected (positions count from the first column, as in BERT).
        """
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.embeddings(input_ids, position_ids, token_type_ids)  # (B, T, embedding width)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, T, hidden)
        rotary = None
        if self.rotary is not None:
            self.rotary.ensure(input_ids.shape[1])
            rotary = self.rotary(position_ids, x.dtype)
        mask = padding_mask_for(attention_mask)  # (B, 1, 1, T) bool, or None without an attention mask
        for layer in self.layers:
            x = layer(x, rotary, mask)  # (B, T, hidden)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ):
        """What the head gives: hidden (B, T, hidden) | MLM logits (B, T, vocab) | class logits (B, labels) |
        span logits (B, T, 2) with padding positions at -inf | replaced-token logits (B, T)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        if self.mlm_head is not None:
            return self.mlm_head(hidden)
        if self.classification_head is not None:
            return self.classification_head(hidden, attention_mask)
        if self.span_head is not None:
            logits = self.span_head(hidden)  # (B, T, 2)
            # Padding positions can never be picked as an answer start or end.
            if attention_mask is not None:
                logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf"))
            return logits
        if self.replaced_token_head is not None:
            return self.replaced_token_head(hidden)
        return hidden
