"""ONNX export: onnxruntime's outputs equal our model's, for a padded prompt, a cached step and the encoder."""

import json

import numpy as np
import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.export.onnx import ENCODER_OUTPUTS, decoder_names, export
from lmforge.generate.engine import left_pad
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed; torch.onnx's exporter needs it")

TEXTS = ["今天天气很好，我们去公园散步吧。", "The quick brown fox jumps over the lazy dog.", "人工智能正在改变世界 123"]
PROMPTS = ["今天天气很好", "The quick brown fox jumps over"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS * 20, vocab_size=320, show_progress=False)


def _run_folder(folder, model, tokenizer):
    tokenizer.save(folder)
    save_model(folder, model)
    return folder


@pytest.fixture(scope="module")
def decoder(tokenizer):
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    return Decoder(config).eval()


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory, decoder, tokenizer):
    run = _run_folder(tmp_path_factory.mktemp("decoder-run"), decoder, tokenizer)
    return export(run, tmp_path_factory.mktemp("decoder-onnx") / "out")


def _session(folder):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs; a spinning thread pool only stalls a busy machine
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def decoder_session(decoder_export):
    return _session(decoder_export)


def _run(session, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    return dict(zip([output.name for output in session.get_outputs()], outputs))


def _prefill(decoder, tokenizer, session):
    """Our logits and cache for a left-padded batch of two prompts, and onnxruntime's outputs for it."""
    prompts = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in PROMPTS]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_id, "cpu")
    assert attention_mask is not None and not attention_mask.all()  # the batch really is padded
    config = decoder.config
    cache = decoder.new_cache(2, input_ids.shape[1] + 1)
    with torch.no_grad():
        logits = decoder(input_ids, attention_mask=attention_mask, cache=cache)
    empty = torch.zeros(2, config.num_kv_heads, 0, config.head_dim)
    input_names, _ = decoder_names(config.num_layers)
    inputs = dict(zip(input_names, (input_ids, attention_mask, *[empty] * (2 * config.num_layers))))
    return logits, cache, attention_mask, _run(session, inputs)


def test_export_writes_a_folder_with_the_kv_cache_signature(decoder_export, decoder_session, decoder):
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in decoder_export.iterdir()
    }
    input_names, output_names = decoder_names(decoder.config.num_layers)
    assert [i.name for i in decoder_session.get_inputs()] == input_names
    assert [o.name for o in decoder_session.get_outputs()] == output_names
    assert decoder_session.get_inputs()[2].shape == ["batch", 2, "past_sequence_length", 16]


def test_prefill_of_a_left_padded_batch_matches(decoder, tokenizer, decoder_session):
    logits, cache, attention_mask, outputs = _prefill(decoder, tokenizer, decoder_session)
    real = attention_mask.bool().numpy()  # padding positions' outputs are never read
    assert np.abs(outputs["logits"] - logits.numpy())[real].max() < TOLERANCE
    for layer in range(decoder.config.num_layers):
        length = cache.length
        assert np.allclose(outputs[f"present.{layer}.key"], cache.keys[layer, :, :, :length].numpy(), atol=TOLERANCE)
        assert np.allclose(outputs[f"present.{layer}.value"], cache.values[layer, :, :, :length], atol=TOLERANCE)


def test_one_decode_step_with_past_matches(decoder, tokenizer, decoder_session):
    _, cache, attention_mask, outputs = _prefill(decoder, tokenizer, decoder_session)
    next_ids = outputs["logits"][:, -1].argmax(-1)[:, None]  # (B, 1)
    next_ids = torch.from_numpy(next_ids).long()
    attention_mask = torch.cat((attention_mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
    with torch.no_grad():
        logits = decoder(next_ids, attention_mask=attention_mask, cache=cache)  # (B, 1, V)
    input_names, _ = decoder_names(decoder.config.num_layers)
    past = [torch.from_numpy(outputs[name.replace("past_key_values", "present")]) for name in input_names[2:]]
    step = _run(decoder_session, dict(zip(input_names, (next_ids, attention_mask, *past))))
    assert np.abs(step["logits"] - logits.numpy()).max() < TOLERANCE
    assert step["present.0.key"].shape[2] == attention_mask.shape[1]


@pytest.mark.parametrize("head", ["none", "replaced_token"])
def test_encoder_hidden_states_with_padding_match(head, tmp_path, tokenizer):
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_position_embeddings=64, head=head,
    )  # fmt: skip
    encoder = Encoder(config).eval()
    out = export(_run_folder(tmp_path / "run", encoder, tokenizer), tmp_path / "onnx")
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    input_ids, attention_mask = tokenizer.pad([tokenizer.encode(text) for text in TEXTS], side="right")
    assert not attention_mask.all()
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 3:] = 1
    with torch.no_grad():
        hidden = encoder(input_ids, attention_mask, token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    outputs = _run(session, inputs)
    assert np.abs(outputs[ENCODER_OUTPUTS[head]] - hidden.numpy()).max() < TOLERANCE  # ELECTRA's: (B, T) logits
    assert json.loads((out / "config.json").read_text())["family"] == "encoder"


def test_other_families_and_a_file_as_out_are_refused(tmp_path, tokenizer):
    config = Seq2SeqConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_heads=2, intermediate_size=64)
    run = _run_folder(tmp_path / "run", Seq2Seq(config), tokenizer)
    with pytest.raises(UserError, match="decoder and encoder"):
        export(run, tmp_path / "onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="writes a folder"):
        export(run, tmp_path / "file")
