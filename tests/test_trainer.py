"""The training loop: losses fall, a resumed run equals an uninterrupted one, damaged checkpoints are skipped."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.data.tokens import LMWindows
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.checkpoint import latest_checkpoint, read_checkpoint
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig, learning_rate, train


def tiny_setup(steps: int = 12, **train_changes):
    rng = np.random.default_rng(0)
    # A corpus with structure to learn: a repeated random "sentence" with noise.
    sentence = rng.integers(0, 64, size=37)
    tokens = np.concatenate([np.where(rng.random(37) < 0.1, rng.integers(0, 64, 37), sentence) for _ in range(200)])
    windows = LMWindows(tokens.astype(np.uint16), context=16, seed=1)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=16
    )
    model = Decoder(config)
    values = dict(max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=0, save_every=4, precision="fp32")
    values.update(train_changes)
    return model, windows, TrainConfig(**values)


def run(model, windows, config, run_dir, resume=False):
    batch_for = lambda index: windows.training_batch(index, config.batch_size)  # noqa: E731
    return train(model, causal_lm_loss, batch_for, config, run_dir, resume=resume, progress=False)


def test_loss_falls(tmp_path):
    model, windows, config = tiny_setup(steps=80, lr=1e-2)
    records = run(model, windows, config, tmp_path)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path):
    model, windows, config = tiny_setup(steps=12, grad_accum=2)
    uninterrupted = [r["loss"] for r in run(model, windows, config, tmp_path / "full")]

    # A run cut short after its first step (by its time budget) ...
    model, windows, config = tiny_setup(steps=12, grad_accum=2, max_minutes=1e-9)
    assert len(run(model, windows, config, tmp_path / "part")) == 1
    # ... resumed by a fresh process with a freshly initialised model.
    model, windows, config = tiny_setup(steps=12, grad_accum=2)
    resumed = run(model, windows, config, tmp_path / "part", resume=True)
    assert resumed[0]["step"] == 2
    assert [r["loss"] for r in resumed] == uninterrupted[1:]


def test_resume_discards_log_lines_after_the_last_checkpoint(tmp_path):
    model, windows, config = tiny_setup(steps=12)
    uninterrupted = [r["loss"] for r in run(model, windows, config, tmp_path)]
    # As if killed after step 11: the step-12 checkpoint never landed, but the log got ahead of step 8.
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000012")
    model, windows, config = tiny_setup(steps=12)
    run(model, windows, config, tmp_path, resume=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert [r["loss"] for r in logged] == uninterrupted
    # Each part of the run says how it trained, at the step it started from.
    assert [(r["step"], r["precision"]) for r in records if "precision" in r] == [
        (0, "fp32 (asked for)"),
        (8, "fp32 (asked for)"),
    ]


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model, windows, config = tiny_setup(steps=8)
    run(model, windows, config, tmp_path)
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step_00000008"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="damaged"):
        assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(55, config) == pytest.approx(0.55)
    assert learning_rate(100, config) == pytest.approx(0.1)


def test_a_time_budget_ends_the_decay_when_the_clock_runs_out():
    config = TrainConfig(max_steps=1000, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, max_minutes=1.0)
    # Step 20 of 1000 is early in steps, but half the minute is gone: the decay follows the clock.
    assert learning_rate(20, config, elapsed_seconds=30.0) == pytest.approx(0.55)
    assert learning_rate(20, config, elapsed_seconds=60.0) == pytest.approx(0.1)
    assert learning_rate(20, config, elapsed_seconds=0.0) > 0.99  # and the steps still bound it
    unbudgeted = TrainConfig(max_steps=1000, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(20, unbudgeted, elapsed_seconds=60.0) > 0.99


def test_a_resumed_run_keeps_its_clock(tmp_path):
    model, windows, config = tiny_setup(steps=8)
    run(model, windows, config, tmp_path)
    _, _, state = read_checkpoint(latest_checkpoint(tmp_path))
    assert state["elapsed_seconds"] > 0
    config.max_steps, config.max_minutes = 9, 1e-9  # the minutes spent before the kill count against the budget
    records = run(model, windows, config, tmp_path, resume=True)
    assert records[-1]["elapsed"] >= state["elapsed_seconds"]


def test_bf16_autocast_trains_with_fp32_master_weights_and_tracks_fp32(tmp_path):
    model, windows, config = tiny_setup(steps=20, lr=1e-2, precision="bf16")
    bf16 = [r["loss"] for r in run(model, windows, config, tmp_path / "bf16")]
    assert all(np.isfinite(bf16))
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    model, windows, config = tiny_setup(steps=20, lr=1e-2, precision="fp32")
    fp32 = [r["loss"] for r in run(model, windows, config, tmp_path / "fp32")]
    # bf16 keeps 8 bits of mantissa: the curves part by a little, not by much (measured: 0.2% at most here).
    assert np.allclose(bf16, fp32, rtol=0.02)
    assert bf16[-1] < 0.8 * bf16[0]  # and it learned like fp32 did


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path):
    model, windows, config = tiny_setup(steps=4)
    eager = [r["loss"] for r in run(model, windows, config, tmp_path / "eager")]
    model, windows, config = tiny_setup(steps=4, compile=True)
    compiled = [r["loss"] for r in run(model, windows, config, tmp_path / "compiled")]
    assert np.allclose(eager, compiled, rtol=1e-4)


def scripted_validation(scores):
    """An evaluate() that returns the next score each call and remembers the weights it was shown."""
    seen = []

    def evaluate(model):
        seen.append({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        return {"score": scores[len(seen) - 1]}

    return evaluate, seen


def test_best_metric_ends_with_the_weights_of_the_best_validation_even_across_a_resume(tmp_path):
    # A run stopped by its time budget after step 1 validates at steps 0 and 1: the best so far is step 1's.
    model, windows, config = tiny_setup(steps=12, eval_every=2, best_metric="valid_score", max_minutes=1e-9)
    batch_for = lambda index: windows.training_batch(index, config.batch_size)  # noqa: E731
    evaluate, seen = scripted_validation([0.1, 0.95])
    train(model, causal_lm_loss, batch_for, config, tmp_path, evaluate, progress=False)
    # Resumed, it validates at steps 2, 4, ..., 12; none beats step 1, though step 4 beats every other one.
    model, windows, config = tiny_setup(steps=12, eval_every=2, best_metric="valid_score")
    resumed_evaluate, resumed_seen = scripted_validation([0.3, 0.9, 0.2, 0.4, 0.1, 0.6])
    train(model, causal_lm_loss, batch_for, config, tmp_path, resumed_evaluate, resume=True, progress=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, seen[1][name], rtol=0, atol=0)
    assert not torch.equal(
        model.state_dict()["layers.0.mlp.up_proj.weight"], resumed_seen[-1]["layers.0.mlp.up_proj.weight"]
    )
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == {"step": 12, "best_step": 1, "best_valid_score": 0.95}


def test_average_last_ends_with_the_mean_of_the_last_checkpoints(tmp_path):
    model, windows, config = tiny_setup(steps=12, save_every=4, keep_last=3, average_last=3)
    records = run(model, windows, config, tmp_path)
    saved = [load_file(tmp_path / "checkpoints" / f"step_{step:08d}" / "model.safetensors") for step in (4, 8, 12)]
    for name, tensor in model.state_dict().items():
        if name in saved[0]:  # the tied output layer is stored once, as the embedding
            torch.testing.assert_close(tensor, sum(state[name] for state in saved) / 3)
    assert not torch.equal(model.state_dict()["norm.weight"], saved[-1]["norm.weight"])
    assert records[-1] == {"step": 12, "averaged_steps": [4, 8, 12]}
    for wrong in ({"average_last": 3}, {"average_last": 2, "best_metric": "valid_loss", "keep_last": 2}):
        with pytest.raises(ValueError, match="average_last"):
            TrainConfig(**wrong)


def test_best_metric_lower_is_better_for_losses():
    from lmforge.train.trainer import better

    assert better("valid_loss", 1.0, 2.0) and not better("valid_loss", 2.0, 1.0)
    assert better("valid_rougeL", 2.0, 1.0) and not better("valid_accuracy", 1.0, 2.0)
    with pytest.raises(ValueError, match="valid_NAME"):
        TrainConfig(best_metric="rougeL")


def test_a_kill_while_the_best_weights_are_replaced_keeps_the_previous_best(tmp_path, monkeypatch):
    from lmforge.train.checkpoint import load_best, read_best, save_best

    save_best(tmp_path, 1, "valid_score", 0.5, {"w": torch.ones(2)})
    real_replace = os.replace

    def killed_after_renaming_the_previous_best_aside(source, target):
        real_replace(source, target)
        if Path(source).name == "best":
            raise KeyboardInterrupt  # the process dies before the new best/ is renamed in

    monkeypatch.setattr(os, "replace", killed_after_renaming_the_previous_best_aside)
    with pytest.raises(KeyboardInterrupt):
        save_best(tmp_path, 2, "valid_score", 0.9, {"w": torch.full((2,), 2.0)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "best").exists()
    assert read_best(tmp_path, "valid_score") == {"step": 1, "metric": "valid_score", "value": 0.5}
    torch.testing.assert_close(load_best(tmp_path)["w"], torch.ones(2))
    save_best(tmp_path, 3, "valid_score", 0.7, {"w": torch.full((2,), 3.0)})
    assert read_best(tmp_path, "valid_score")["step"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]
