"""Training survives what real runs meet: NaN losses, a full disk, and kill -9 at any moment."""

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_trainer import tiny_setup

from lmforge.errors import UserError
from lmforge.train.checkpoint import average_checkpoints, latest_checkpoint, save_checkpoint
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import train


def poisoned(bad_calls: set[int]):
    """causal_lm_loss, but NaN on the given calls (counted from 1): a blow-up that a smaller step avoids."""
    calls = [0]

    def objective(model, batch):
        calls[0] += 1
        loss, tokens = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls[0] in bad_calls else loss), tokens

    return objective


def run(objective, config, run_dir, windows, model):
    batch_for = lambda index: windows.training_batch(index, config.batch_size)  # noqa: E731
    return train(model, objective, batch_for, config, run_dir, progress=False)


def test_a_nan_step_is_skipped_and_logged(tmp_path):
    model, windows, config = tiny_setup(steps=8)
    records = run(poisoned({5}), config, tmp_path, windows, model)
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [5] and "nan" in skipped[0]["skipped"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 6, 7, 8]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_steps_in_a_row_roll_back_to_the_last_checkpoint_with_a_smaller_learning_rate(tmp_path):
    model, windows, config = tiny_setup(steps=10, save_every=4, max_bad_steps=3, rollback_lr_factor=0.5)
    records = run(poisoned({6, 7, 8}), config, tmp_path, windows, model)
    rollback = next(r for r in records if "rolled_back_to" in r)
    assert rollback["rolled_back_to"] == 4 and rollback["lr_scale"] == 0.5
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in logged if "loss" in r]
    assert trained == list(range(1, 11))  # steps 5.. were redone once, and the log holds each step once
    _, _, plain = tiny_setup(steps=10)
    halved = next(r for r in logged if r.get("step") == 9 and "loss" in r)["lr"]
    from lmforge.train.trainer import learning_rate

    assert halved == pytest.approx(0.5 * learning_rate(8, plain))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_with_no_checkpoint_to_go_back_to_is_a_clear_error(tmp_path):
    model, windows, config = tiny_setup(steps=10, save_every=100, max_bad_steps=2)
    with pytest.raises(UserError, match="no checkpoint to go back to: lower train.lr"):
        run(poisoned({1, 2}), config, tmp_path, windows, model)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    model, windows, config = tiny_setup(steps=4)
    run(causal_lm_loss, config, tmp_path, windows, model)
    good = latest_checkpoint(tmp_path)
    state = {name: torch.zeros(1_000_000) for name in ("a", "b")}  # 8 MB: more than the disk "has" left
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, as ENOSPC would come
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    try:
        with pytest.raises(UserError) as caught:
            save_checkpoint(tmp_path, 8, state, {"state": {}, "param_groups": []}, {"tokens_seen": 0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(caught.value)
    assert "step 8" in message and "step_00000004" in message and "intact" in message
    assert os.strerror(errno.EFBIG) in message
    assert latest_checkpoint(tmp_path) == good  # still there, still passing its checksums
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))  # no half-written leftovers


KILL_RECIPE = """
data: {source: CORPUS, vocab_size: 300, context: 32}
model: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}
train: {max_steps: 60, batch_size: 8, lr: 3.0e-3, warmup_steps: 2, eval_every: 0, save_every: 1, keep_last: 2}
"""


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"第{i}条：今天天气晴朗，气温{i % 30}度，市民出门游玩。" for i in range(2000)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(KILL_RECIPE.replace("CORPUS", str(corpus)))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(tmp_path / "cache")}

    def command(out, resume=False):
        return [sys.executable, "-m", "lmforge", "pretrain", "--config", str(recipe), "--out", str(out)] + (
            ["--resume"] if resume else []
        )

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    subprocess.run(command(tmp_path / "whole"), env=environment, check=True, capture_output=True, timeout=600)
    uninterrupted = losses(tmp_path / "whole")
    out = tmp_path / "killed"
    chooser = random.Random(4)
    kills = 0
    for attempt in range(5):
        logged = len(losses(out)) if (out / "metrics.jsonl").is_file() else 0
        process = subprocess.Popen(
            command(out, resume=attempt > 0), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Once this attempt trains, kill it at a random moment: with a checkpoint after every step,
        # that is as often during a checkpoint write as during a step.
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and len(losses(out)) > logged:
                break
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.0, 0.6))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    if not (out / "model.safetensors").is_file():
        subprocess.run(command(out, resume=True), env=environment, check=True, capture_output=True, timeout=600)
    assert kills >= 3
    assert losses(out) == uninterrupted  # step for step, bit for bit


def test_averaging_the_last_checkpoints_is_the_mean_of_their_weights(tmp_path):
    weights = {step: {"w": torch.full((2, 3), float(step)), "count": torch.tensor([step])} for step in (1, 2, 4, 7)}
    for step, state in weights.items():
        save_checkpoint(tmp_path, step, state, {"state": {}, "param_groups": []}, {"tokens_seen": 0}, keep_last=3)
    averaged, steps = average_checkpoints(tmp_path, 2)
    assert steps == [4, 7] and torch.equal(averaged["w"], torch.full((2, 3), 5.5))
    assert torch.equal(averaged["count"], torch.tensor([7]))  # not floating point: the newest
    averaged, steps = average_checkpoints(tmp_path, 5)  # only three kept: all of them
    assert steps == [2, 4, 7] and torch.allclose(averaged["w"], torch.full((2, 3), 13 / 3))
    with pytest.raises(UserError, match="no intact checkpoint"):
        average_checkpoints(tmp_path / "empty", 2)
