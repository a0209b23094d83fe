"""GGUF export: what the file holds, read back with gguf's reader, and llama.cpp running it as we do.

The llama.cpp tests use llama-cpp-python (built from source by pip) and skip without it:
its tokenizer must give our ids, its greedy output at f16 must equal ours token for token,
and at q8_0 its top-1 choice must agree with ours on nearly every step.
"""

import contextlib
import json

import numpy as np
import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.export.gguf import LLAMA3_SPLIT_PATTERN, export, rotary_halves_to_pairs
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import LM
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.layers import RotaryEmbedding, apply_rotary

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -e .)")

TRAINING_TEXTS = [
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变我们的生活和工作方式。",
    "北京是中国的首都，上海是最大的城市。",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models learn from text, one token at a time.",
    "In 2024 there were 365 days; in 2025, 365 again.",
]
# Mixed scripts, digits, spaces, newlines and special-token text: every branch of the split pattern.
PROMPTS = [
    "今天天气很好",
    "The quick brown fox",
    "人工智能 and large language models, 2024年12月31日!\n\n  Hello   世界",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 32
Q8_0_AGREEMENT_FLOOR = 0.9


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TRAINING_TEXTS * 20, vocab_size=512, show_progress=False)


def _decoder(tokenizer, tied: bool) -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
        intermediate_size=256, max_position_embeddings=256, tie_word_embeddings=tied,
    )  # fmt: skip
    return Decoder(config).eval()


def _memorize(model: Decoder, tokenizer: Tokenizer, steps: int = 150) -> Decoder:
    """Train on TRAINING_TEXTS for a moment, so the model continues them with confident choices.

    NOTE: in a random model the top two logits are often closer than llama.cpp's f16 arithmetic can tell
    apart (max |logit difference| about 0.02, top-two margins down to 0.003), so 32 greedy tokens would
    hinge on rounding, not on the export. Trained, the margins stay far above the f16 error.
    """
    stream = torch.tensor([i for text in TRAINING_TEXTS for i in tokenizer.encode(text, add_bos=True, add_eos=True)])
    stream = stream.repeat(4)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with _one_thread():
        for _ in range(steps):
            starts = torch.randint(0, len(stream) // 2, (8,), generator=generator).tolist()
            rows = torch.stack([stream[start : start + 65] for start in starts])  # (8, 65)
            loss = model(rows[:, :-1], targets=rows[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@contextlib.contextmanager
def _one_thread():
    """Tensors this small take a few ms per step on one thread; two threads on a busy 2-core machine stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("run")
    tokenizer.save(folder)
    save_model(folder, _memorize(_decoder(tokenizer, tied=True), tokenizer))
    return folder


@pytest.fixture(scope="module")
def lm(run):
    import lmforge

    return lmforge.load(run, device="cpu")


@pytest.fixture(scope="module")
def gguf_files(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {quant: export(run, folder / f"model-{quant}.gguf", quant=quant) for quant in ("f16", "q8_0")}


def _field(reader, key):
    return reader.fields[key].contents()


def test_metadata_tells_llama_cpp_the_architecture(gguf_files, lm):
    reader = gguf.GGUFReader(gguf_files["f16"])
    config = lm.model.config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_heads,
        "llama.attention.head_count_kv": config.num_kv_heads,
        "llama.rope.dimension_count": config.head_dim,
        "llama.vocab_size": config.vocab_size,
        "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
    }
    assert {key: _field(reader, key) for key in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert _field(gguf.GGUFReader(gguf_files["q8_0"]), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_tokenizer_metadata_is_our_vocabulary(gguf_files, lm):
    reader = gguf.GGUFReader(gguf_files["f16"])
    tokenizer = lm.tokenizer
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    # Byte-level pieces as tokenizer.json spells them ("Ġfox"), specials as their text, in id order.
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.backend.id_to_token(index) for index in range(tokenizer.vocab_size)]
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.im_end_id]
    assert all(types[i] == gguf.TokenType.CONTROL for i in specials)
    assert types.count(gguf.TokenType.NORMAL) == tokenizer.vocab_size - 7
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tokenizer.vocab_size - 7 - 256 and all(len(merge.split(" ")) == 2 for merge in merges)
    ids = {key: _field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "eot")}
    assert ids == {"bos": 1, "eos": 2, "padding": 0, "eot": tokenizer.im_end_id}
    assert bool(_field(reader, "tokenizer.ggml.add_bos_token"))
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def _read_weights(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (GGML type, float32 array in PyTorch's (out, in) order)."""
    weights = {}
    for tensor in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = (tensor.tensor_type.name, values.reshape(tuple(reversed(tensor.shape.tolist()))))
    return weights


@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 2e-3), ("q8_0", 2e-2)])
def test_weights_read_back_under_llama_cpp_names(gguf_files, lm, quant, tolerance):
    weights = _read_weights(gguf_files[quant])
    model, config = lm.model, lm.model.config
    assert "output.weight" not in weights  # tied: llama.cpp reuses token_embd
    assert len(weights) == 2 + 9 * config.num_layers
    kind, norm = weights["output_norm.weight"]
    assert kind == "F32" and np.array_equal(norm, model.norm.weight.detach().numpy())
    layer = model.layers[1]
    expected = {
        "token_embd.weight": model.embed_tokens.weight,
        "blk.1.attn_q.weight": rotary_halves_to_pairs(layer.self_attn.q_proj.weight, config.num_heads),
        "blk.1.attn_k.weight": rotary_halves_to_pairs(layer.self_attn.k_proj.weight, config.num_kv_heads),
        "blk.1.attn_v.weight": layer.self_attn.v_proj.weight,
        "blk.1.ffn_down.weight": layer.mlp.down_proj.weight,
    }
    for name, tensor in expected.items():
        kind, values = weights[name]
        assert kind == quant.upper()
        assert np.abs(values - tensor.detach().numpy()).max() < tolerance * tensor.abs().max().item(), name


def test_untied_output_layer_is_written(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "run")
    model = _decoder(tokenizer, tied=False)
    save_model(tmp_path / "run", model)
    weights = _read_weights(export(tmp_path / "run", tmp_path / "untied.gguf"))
    kind, output = weights["output.weight"]
    assert kind == "F16" and np.allclose(output, model.lm_head.weight.detach().numpy(), atol=1e-3)


def _qkv_bias_run(folder, tokenizer) -> Decoder:
    """A Qwen2-style decoder (biases on q, k and v, large enough to matter) saved as a run folder."""
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=256, max_position_embeddings=256, qkv_bias=True,
    )  # fmt: skip
    model = Decoder(config).eval()
    for layer in model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(projection.bias, std=0.5)
    tokenizer.save(folder)
    save_model(folder, model)
    return model


def test_qkv_biases_are_written_and_q_k_ones_permuted(tmp_path, tokenizer):
    model = _qkv_bias_run(tmp_path / "run", tokenizer)
    weights = _read_weights(export(tmp_path / "run", tmp_path / "bias.gguf"))
    attention = model.layers[0].self_attn
    for name, bias in [("q", attention.q_proj.bias), ("k", attention.k_proj.bias), ("v", attention.v_proj.bias)]:
        kind, values = weights[f"blk.0.attn_{name}.bias"]
        expected = bias if name == "v" else rotary_halves_to_pairs(bias, 4 if name == "q" else 2)
        assert kind == "F32" and np.array_equal(values, expected.detach().numpy())
    assert not torch.equal(rotary_halves_to_pairs(attention.q_proj.bias, 4), attention.q_proj.bias)


def _with_split_pattern(tokenizer: Tokenizer, pattern: str) -> Tokenizer:
    saved = json.loads(tokenizer.to_str())
    saved["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    return Tokenizer.from_str(json.dumps(saved), tokenizer.chat_template)


def test_split_patterns_llama_cpp_knows_by_name(tmp_path, tokenizer):
    model = _decoder(tokenizer, tied=True)
    gpt2_pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    for pattern, name in [(LLAMA3_SPLIT_PATTERN, "llama-bpe"), (gpt2_pattern, None)]:
        folder = tmp_path / str(name)
        _with_split_pattern(tokenizer, pattern).save(folder)
        save_model(folder, model)
        if name is None:
            with pytest.raises(UserError, match="tokenize this one differently"):
                export(folder, tmp_path / "refused.gguf")
        else:
            assert _field(gguf.GGUFReader(export(folder, tmp_path / "llama3.gguf")), "tokenizer.ggml.pre") == name


def test_permuted_rows_make_llama_cpp_rotary_equal_ours():
    """GGML's `llama` rotary turns neighbours (2i, 2i+1); on permuted rows it must give our rotation, permuted."""
    torch.manual_seed(0)
    heads, head_dim, positions, theta = 3, 16, 7, 10000.0
    weight = torch.randn(heads * head_dim, 24)
    x = torch.randn(positions, 24)
    rotary = RotaryEmbedding(head_dim, positions, theta)
    cos, sin = rotary(torch.arange(positions), torch.float32)  # (T, 1, D)
    ours = apply_rotary((x @ weight.T).view(1, positions, heads, head_dim), cos, sin)  # (1, T, H, D)
    pairs = (x @ rotary_halves_to_pairs(weight, heads).T).view(positions, heads, head_dim // 2, 2)
    angle = torch.arange(positions)[:, None] * theta ** (-torch.arange(0, head_dim, 2) / head_dim)  # (T, D/2)
    angle = angle[:, None]  # (T, 1, D/2)
    first = pairs[..., 0] * angle.cos() - pairs[..., 1] * angle.sin()
    second = pairs[..., 0] * angle.sin() + pairs[..., 1] * angle.cos()
    ggml = torch.stack((first, second), dim=-1).reshape(positions, heads * head_dim)
    expected = rotary_halves_to_pairs(ours.reshape(positions, heads * head_dim).T, heads).T
    assert torch.allclose(ggml, expected, atol=1e-5)


def test_refusals(tmp_path, run, tokenizer):
    with pytest.raises(UserError, match="unknown GGUF quantization"):
        export(run, tmp_path / "model.gguf", quant="q4_k")
    with pytest.raises(UserError, match="one file"):
        export(run, tmp_path)
    tokenizer.save(tmp_path / "encoder")
    save_model(tmp_path / "encoder", Encoder(EncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32)))
    with pytest.raises(UserError, match="decoder run folders"):
        export(tmp_path / "encoder", tmp_path / "encoder.gguf")


# --- llama.cpp itself -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    module = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)"
    )
    # NOTE: pip builds llama.cpp with -march=native; on a CPU that advertises AMX it multiplies q8_0 matrices
    # with AMX tiles, which raise SIGILL where the kernel or a sandbox does not grant tile state (as here).
    # Extra buffer types (AMX, weight repacking) change only speed, so these tests load without them.
    defaults = module.llama_cpp.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.llama_cpp, "llama_model_default_params", without_extra_buffer_types)
        yield module


def _llama(llama_cpp, path, logits_all=False):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        n_threads=1,
        n_threads_batch=1,
        logits_all=logits_all,
        seed=0,
        verbose=False,
    )


def _our_greedy(lm: LM, prompt_ids: list[int]) -> list[int]:
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
    with _one_thread():
        return generate_ids(lm.model, [prompt_ids], config)[0].token_ids


def test_llama_cpp_tokenizes_like_us(llama_cpp, gguf_files, lm):
    llama = _llama(llama_cpp, gguf_files["f16"])
    for prompt in PROMPTS:
        # special=True: llama.cpp then matches special-token text, as our tokenizer always does.
        assert llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) == lm.encode_prompt(prompt)
        ids = lm.tokenizer.encode(prompt)
        assert llama.detokenize(ids).decode("utf-8") == lm.tokenizer.decode(ids)  # special tokens left out
    # A chat through the file's own template: the rendered <bos> is not doubled by add_bos_token.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "今天天气很好, hello"}]
    formatter = Jinja2ChatFormatter(llama.metadata["tokenizer.chat_template"], eos_token="<eos>", bos_token="<bos>")
    rendered = formatter(messages=messages)
    ids = llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
    assert ids == lm.encode_chat_prompt(messages, max_new_tokens=NEW_TOKENS)


def test_llama_cpp_greedy_output_equals_ours_at_f16(llama_cpp, gguf_files, lm):
    llama = _llama(llama_cpp, gguf_files["f16"])
    for prompt in PROMPTS[:3]:
        prompt_ids = lm.encode_prompt(prompt)
        ours = _our_greedy(lm, prompt_ids)
        theirs = []
        for token in llama.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == NEW_TOKENS:
                break
        assert theirs == ours, prompt


def test_llama_cpp_logits_match_ours_with_qkv_biases(llama_cpp, tmp_path, tokenizer):
    """llama.cpp's `llama` graph adds optional q/k/v biases; the q and k ones must be permuted like the rows."""
    import lmforge

    model = _qkv_bias_run(tmp_path / "run", tokenizer)
    llama = _llama(llama_cpp, export(tmp_path / "run", tmp_path / "bias.gguf"), logits_all=True)
    ids = lmforge.load(tmp_path / "run", device="cpu").encode_prompt(PROMPTS[2])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()  # (T, V)
    llama.eval(ids)
    theirs = np.asarray(llama.scores[: len(ids)])
    # f16 weights and activations: about 4e-4 here; q/k biases left unpermuted give about 0.03.
    assert np.abs(theirs - ours).max() < 5e-3


def test_llama_cpp_q8_0_agrees_on_top_1(llama_cpp, gguf_files, lm):
    """Teacher-forced on our greedy continuation: llama.cpp's argmax at each step against ours."""
    llama = _llama(llama_cpp, gguf_files["q8_0"], logits_all=True)
    agreed = total = 0
    for prompt in PROMPTS[:3]:
        prompt_ids = lm.encode_prompt(prompt)
        ours = _our_greedy(lm, prompt_ids)
        llama.reset()
        llama.eval(prompt_ids + ours[:-1])
        theirs = np.asarray(llama.scores[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ours)]).argmax(-1)
        agreed += int((theirs == np.asarray(ours)).sum())
        total += len(ours)
    rate = agreed / total
    print(f"q8_0 top-1 agreement with lmforge: {agreed}/{total} = {rate:.1%}")
    assert rate >= Q8_0_AGREEMENT_FLOOR
