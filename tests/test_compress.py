"""Quantization and pruning: models close to fp32, run folders that load and generate, exact sparsity, recovery
that keeps zeros zero (for decoders only), and the CLI. The layer formats themselves: test_quantized.py."""

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.compress.prune import apply_masks, magnitude_masks, prune_run, prune_targets, recover
from lmforge.compress.quantize import quantize_model, quantize_run
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokens import LMWindows
from lmforge.errors import UserError
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import save_generation_config
from lmforge.models import load_model, save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.quantized import quantized_layers
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run_folder import load_tensors
from lmforge.train.trainer import TrainConfig

TEXTS = [f"第{index}条新闻：今年经济工作的主要任务是稳定增长，人民生活继续改善。" for index in range(40)]


def tiny_config(vocab_size: int = 256) -> DecoderConfig:
    # Widths that are multiples of 16 and 32, so the packed int8 and int4 CPU kernels run, not only the fallback.
    return DecoderConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_position_embeddings=64, initializer_range=0.1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32")
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300, show_progress=False)
    tokenizer.save(folder)
    torch.manual_seed(0)
    save_model(folder, Decoder(tiny_config(tokenizer.vocab_size)))
    save_generation_config(folder, SamplingConfig(max_new_tokens=8), tokenizer)
    return folder


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).pow(2).mean().sqrt() / (expected - expected.mean()).pow(2).mean().sqrt()).item()


# --- models ---------------------------------------------------------------------------------------------------


# Relative RMS error of the logits against fp32 (RMS of the difference / RMS of the centred fp32 logits), on a
# random-weight model: weights drawn N(0, s) make the worst case, as no trained structure dominates the logits.
# A weight's rounding error is uniform over one step, std = step / sqrt(12), and it passes through 15 linear
# layers (2 blocks x 7, plus the output layer), whose independent errors add up as about sqrt(15) = 3.9 times one.
# int8: step = 2 max|w| / 254 with max|w| ~ 2.5 s (64-128 weights a row): 0.6% of s per layer, ~2.2% in all.
# int8-dynamic adds 7-bit activations with one scale per call (max |x| ~ 3.5 std over 48 rows): ~6.5% in all.
# int4: step = a group's range / 15 ~ 4 s / 15: 7.7% of s per layer, ~30% in all (a wrong nibble order or group
# layout gives ~140%). bf16: 2^-9 relative per weight and per activation: ~1%.
# Measured over five seeds: int8 1.6-2.7%, int8-dynamic 4-8%, int4 21-35%, bf16 ~1%; bounds are about 2x theory.
LOGIT_TOLERANCE = {"int8": 0.05, "int8-dynamic": 0.15, "int4": 0.6, "bf16": 0.03}


def logits_two_ways(model: Decoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full forward over 48 rows: dequantize + F.linear; the last position decoded over a cache: packed kernels)."""
    with torch.no_grad():
        full = model(input_ids).float()
        cache = model.new_cache(1, input_ids.shape[1])
        model(input_ids[:1, :-1], cache=cache)
        step = model(input_ids[:1, -1:], cache=cache).float()
    return full, step[0, -1]


@pytest.mark.parametrize("method", ["int8", "int8-dynamic", "int4", "bf16"])
def test_quantized_model_logits_stay_close_to_fp32(method):
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    input_ids = torch.randint(0, 256, (2, 24))
    expected, _ = logits_two_ways(model, input_ids)
    quantize_model(model, method)
    full, step = logits_two_ways(model, input_ids)
    assert relative_rms(full, expected) < LOGIT_TOLERANCE[method]
    assert relative_rms(step, expected[0, -1]) < LOGIT_TOLERANCE[method]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_computes_exactly_what_its_dequantized_weights_say(method):
    """Against an fp32 model holding the dequantized weights: the plumbing (tied output layer, caches) adds nothing."""
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    reference = copy.deepcopy(model)
    quantize_model(model, method)
    with torch.no_grad():
        for name, layer in quantized_layers(model).items():
            reference.get_submodule(name).weight.copy_(layer.dequantize())  # lm_head: its tied embedding too
    input_ids = torch.randint(0, 256, (2, 24))
    (full, step), (expected_full, expected_step) = (
        logits_two_ways(model, input_ids),
        logits_two_ways(reference, input_ids),
    )
    torch.testing.assert_close(full, expected_full, rtol=1e-5, atol=1e-5)
    # The packed kernels multiply in bf16: 2^-9 relative per value, ~1% after 15 layers.
    assert relative_rms(step, expected_step) < 0.03


@pytest.mark.parametrize("method", ["int8", "int8-dynamic", "int4", "bf16"])
def test_quantized_run_folder_loads_everywhere_and_generates(run_folder, tmp_path, method):
    out = tmp_path / method
    summary = quantize_run(run_folder, out, method)
    assert summary["bytes_after"] < summary["bytes_before"]
    entry = json.loads((out / "config.json").read_text())["quantization"]
    assert entry["method"] == method
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (run_folder / name).read_bytes()

    # The model quantized in memory and the one loaded back compute the same numbers.
    in_memory = load_model(run_folder)
    quantize_model(in_memory, method)
    lm = lmforge.load(out, device="cpu")
    if method == "bf16":
        assert lm.model.embed_tokens.weight.dtype == torch.bfloat16 and not quantized_layers(lm.model)
    else:
        assert set(quantized_layers(lm.model)) == set(entry["modules"])
        assert "lm_head" in entry["modules"]
        # The tied embedding is stored once, as the quantized output layer.
        assert "embed_tokens.weight" not in load_tensors(out / "model.safetensors")
    input_ids = torch.tensor([lm.encode_prompt(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids), in_memory(input_ids), rtol=0, atol=0)

    texts = lm.generate([TEXTS[1][:5], TEXTS[2][:9]], temperature=0, max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_quantize_refuses_what_it_cannot_do(run_folder, tmp_path):
    with pytest.raises(UserError, match="unknown quantization method"):
        quantize_run(run_folder, tmp_path / "a", "int3")
    with pytest.raises(UserError, match="group size 48"):
        quantize_run(run_folder, tmp_path / "b", "int4", group_size=48)
    quantize_run(run_folder, tmp_path / "c", "int8")
    with pytest.raises(UserError, match="already quantized"):
        quantize_run(tmp_path / "c", tmp_path / "d", "int4")


# --- pruning --------------------------------------------------------------------------------------------------


def test_layer_pruning_zeroes_exactly_the_smallest_weights_of_each_layer():
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    masks = magnitude_masks(model, 0.3, "layer")
    assert "lm_head" not in masks and set(masks) == set(prune_targets(model))
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    apply_masks(model, masks)
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        assert (weight == 0).sum().item() == round(0.3 * weight.numel())
        assert before[name][~keep].abs().max() <= before[name][keep].abs().min()


def test_global_pruning_reaches_the_sparsity_over_all_layers_with_one_threshold():
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    masks = magnitude_masks(model, 0.5, "global")
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    apply_masks(model, masks)
    total = sum(weight.numel() for weight in weights.values())
    zeros = sum((model.get_submodule(name).weight == 0).sum().item() for name in masks)
    assert zeros == round(0.5 * total)
    largest_pruned = max(weights[name][~keep].abs().max() for name, keep in masks.items())
    smallest_kept = min(weights[name][keep].abs().min() for name, keep in masks.items())
    assert largest_pruned <= smallest_kept
    # The output projections start smaller (scaled init), so one global threshold prunes them more.
    per_layer = [1 - keep.float().mean().item() for keep in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.1


def test_recovery_keeps_pruned_weights_at_zero_and_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = Decoder(tiny_config(vocab_size=32))
    masks = magnitude_masks(model, 0.5, "layer")
    apply_masks(model, masks)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    # A token stream with a pattern a tiny model picks up in a few steps: 0 1 2 ... 31 0 1 2 ...
    tokens = np.arange(64 * 40) % 32
    train_windows, valid_windows = LMWindows(tokens, 64, seed=0), LMWindows(tokens[: 64 * 4 + 1], 64)
    config = TrainConfig(max_steps=15, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, eval_windows=4)
    records = recover(model, masks, train_windows, valid_windows, [b"x"] * 32, config, tmp_path, progress=False)
    losses = [record["valid_loss"] for record in records if "valid_loss" in record]
    assert losses[-1] < losses[0] - 0.5
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert (weight[~keep] == 0).all()
        assert not torch.equal(weight[keep], before[name][keep])  # the kept weights did train
    # The hooks are gone afterwards: the model trains normally again.
    assert all(not model.get_submodule(name).weight._backward_hooks for name in masks)


def test_recovery_is_refused_for_an_encoder_decoder_although_it_has_a_cache(tmp_path):
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        vocab_size=64, hidden_size=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, intermediate_size=64
    )
    save_model(tmp_path / "seq2seq", Seq2Seq(config))
    with pytest.raises(UserError, match="recovery fine-tuning is for decoders"):
        prune_run(tmp_path / "seq2seq", tmp_path / "out", 0.5, recover_steps=2, device="cpu", progress=False)


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_quantize_prune_then_generate(run_folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["quantize", "--model", str(run_folder), "--method", "int4", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 0, result.output
    assert "int4" in result.output and "smaller" in result.output

    result = runner.invoke(
        app,
        ["prune", "--model", str(run_folder), "--sparsity", "0.5", "--scope", "global", "--out", str(tmp_path / "p")],
    )
    assert result.exit_code == 0, result.output
    assert "50.0% zeros" in result.output
    assert json.loads((tmp_path / "p" / "prune.json").read_text())["scope"] == "global"

    for folder in ("q", "p"):
        result = runner.invoke(
            app, ["generate", TEXTS[0][:4], "--model", str(tmp_path / folder), "--max-new-tokens", "4"]
        )
        assert result.exit_code == 0, result.output
        assert result.output.startswith(TEXTS[0][:4])

    result = runner.invoke(
        app, ["quantize", "--model", str(run_folder), "--method", "fp8", "--out", str(tmp_path / "x")]
    )
    # `lmforge` (cli.main) prints a UserError as one line and exits with code 2.
    assert isinstance(result.exception, UserError) and "unknown quantization method 'fp8'" in str(result.exception)


def test_cli_help_has_examples():
    runner = CliRunner()
    for command in ("quantize", "prune"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and f"lmforge {command} --model" in result.output
