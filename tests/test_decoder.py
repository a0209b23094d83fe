"""Our decoder against a live reference (transformers' LlamaForCausalLM) and its own invariants."""

import pytest
import torch

from lmforge.export.hf import from_llama_state, llama_config
from lmforge.models.decoder import Decoder, DecoderConfig

transformers = pytest.importorskip("transformers")


def tiny_config(**changes) -> DecoderConfig:
    values = dict(
        vocab_size=97,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(changes)
    return DecoderConfig(**values)


def hf_llama(config: DecoderConfig):
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**llama_config(config), attn_implementation="eager")
    ).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama(tied):
    config = tiny_config(tie_word_embeddings=tied)
    reference = hf_llama(config)
    ours = Decoder(config).eval()
    missing, unexpected = ours.load_state_dict(from_llama_state(reference.state_dict()), strict=False)
    assert not unexpected and not missing
    input_ids = torch.randint(0, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = ours(input_ids)
    assert (actual - expected).abs().max().item() < 1e-4


def test_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    input_ids = torch.randint(0, 97, (2, 30))
    changed = input_ids.clone()
    changed[:, 20:] = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        original, altered = model(input_ids), model(changed)
    assert torch.equal(original[:, :20], altered[:, :20])
    assert not torch.allclose(original[:, 20:], altered[:, 20:])


def test_cached_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    input_ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(input_ids)
        cache = model.new_cache(batch_size=2, max_length=24)
        steps = [model(input_ids[:, :8], cache=cache)]
        steps += [model(input_ids[:, position : position + 1], cache=cache) for position in range(8, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_left_padded_row_equals_row_alone():
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    short = torch.randint(1, 97, (1, 5))
    long = torch.randint(1, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    attention_mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        batched = model(batch, attention_mask=attention_mask)
        alone = model(short)
    assert torch.isfinite(batched).all()
    assert (batched[0, 4:] - alone[0]).abs().max().item() < 1e-5


def test_parameter_count_counts_tied_weights_once():
    tied = Decoder(tiny_config(tie_word_embeddings=True))
    untied = Decoder(tiny_config(tie_word_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == 97 * 64


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
