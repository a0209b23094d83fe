"""ELECTRA's pretraining pair (https://arxiv.org/abs/2003.10555): a small masked-LM generator and a discriminator.

The discriminator is the encoder that is kept and fine-tuned: an `Encoder` with
the `replaced_token` head, which scores every token as original or replaced.
The generator is an `Encoder` with a masked-LM head, as deep as the
discriminator and `generator_size` times as wide (in whole heads of the
discriminator's head size; the feed-forward scaled alike). As in the paper
(sec. 3.2) the two share the token, position and segment embeddings: the
generator reads them through a projection to its width and predicts through the
same token embeddings (its MLM head is tied to them). This module knows the two
networks and what they share, not masking, sampling or the losses
(`train/objectives.py`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lmforge.models.encoder import Encoder, EncoderConfig


def generator_config(discriminator: EncoderConfig, size: float) -> EncoderConfig:
    """The generator's shape: `size` x the discriminator's width in whole heads (at least one), same depth."""
    if not 0 < size <= 1:
        raise ValueError(f"generator_size must be in (0, 1], not {size}")
    num_heads = max(1, round(discriminator.num_heads * size))
    hidden_size = num_heads * discriminator.head_dim
    intermediate_size = max(1, round(discriminator.intermediate_size * hidden_size / discriminator.hidden_size))
    return dataclasses.replace(
        discriminator,
        hidden_size=hidden_size,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        embedding_size=discriminator.embedding_width,  # the discriminator's embeddings, projected to hidden_size
        head="mlm",
    )


class Electra(nn.Module):
    """`discriminator` (config's shape, replaced_token head) and `generator` (narrower, MLM head), embeddings shared."""

    def __init__(self, config: EncoderConfig, generator_size: float) -> None:
        super().__init__()
        # Registered first, so the shared parameters are named (and checkpointed) as the discriminator's.
        self.discriminator = Encoder(dataclasses.replace(config, head="replaced_token"))
        self.generator = Encoder(generator_config(config, generator_size), embeddings=self.discriminator.embeddings)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters stored once in a checkpoint, {copy name: source name}: the generator's view of the shared
        embeddings, and its MLM projection, are the discriminator's embedding weights."""
        shared = {
            f"generator.embeddings.{name}": f"discriminator.embeddings.{name}"
            for name in self.discriminator.embeddings.state_dict()
        }
        for copy, source in self.generator.tied_weights.items():
            shared[f"generator.{copy}"] = shared[f"generator.{source}"]
        return shared

    def parameter_counts(self) -> tuple[int, int]:
        """(discriminator, generator without the shared embeddings)."""
        discriminator = {id(parameter) for parameter in self.discriminator.parameters()}
        generator = sum(p.numel() for p in self.generator.parameters() if id(p) not in discriminator)
        return self.discriminator.num_parameters(), generator
