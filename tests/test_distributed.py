"""torchrun on 2 CPU processes (gloo): DDP takes the same steps as one process; FSDP checkpoints and resumes;
both with AdamW and with Muon."""

import json
import os
import shutil
import subprocess
import sys

import pytest

STEPS = 20
# fp32: with bf16 autocast (what precision auto picks on a CPU with fast bf16) a batch split over two processes
# rounds differently from the whole batch in one, about 5e-5 of the loss after 20 steps.
RECIPE = f"""
data: {{source: CORPUS, vocab_size: 300, context: 32}}
model: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}
train: {{max_steps: {STEPS}, batch_size: 8, lr: 3.0e-3, warmup_steps: 2,
        eval_every: 10, eval_windows: 8, save_every: 10, precision: fp32}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"第{i}条新闻：今天北京天气晴朗，气温{i % 30}度，市民出门游玩。" for i in range(3000)))
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.replace("CORPUS", str(corpus)))
    return path


def run(recipe, out, processes=1, *extra):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(out.parent / "cache")}
    launcher = [sys.executable, "-m", "lmforge"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "lmforge"]
    command = [*launcher, "pretrain", "--config", str(recipe), "--out", str(out), *extra]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def test_ddp_on_two_processes_takes_the_same_steps_as_one(recipe, tmp_path):
    run(recipe, tmp_path / "one")
    run(recipe, tmp_path / "two", 2)
    alone, together = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(together) == list(range(1, STEPS + 1))
    assert together == pytest.approx(alone, rel=1e-5)
    assert alone[STEPS] < alone[1] - 1  # it learned: the comparison is between real runs
    assert not list((tmp_path / "two").glob("*rank*"))  # only rank 0 wrote the run folder


@pytest.mark.slow  # several torchrun launches: `make test-all`
def test_fsdp_checkpoints_and_resumes_and_any_layout_reads_its_checkpoints(recipe, tmp_path):
    out = tmp_path / "fsdp"
    run(recipe, out, 2, "--fsdp")
    uninterrupted = losses(out)
    run(recipe, tmp_path / "plain")
    assert uninterrupted == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    # Lose the last checkpoint, as a run killed between steps 10 and 20 would have.
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    run(recipe, out, 2, "--fsdp", "--resume")
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-5)
    # The checkpoints hold full tensors by name: one process resumes what FSDP on two wrote.
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    run(recipe, out, 1, "--resume")
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-5)


@pytest.mark.slow  # end to end through subprocesses: `make test-all` (keeps `make test` under 10 minutes)
def test_chat_fine_tuning_runs_under_torchrun(base_run, chat_data, tmp_path):
    out = tmp_path / "chat"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmforge", "finetune",
               "--task", "chat", "--base", str(base_run), "--data", str(chat_data), "--out", str(out),
               "--train.max_steps", "8", "--train.batch_size", "16", "--train.lr", "3e-3", "--train.eval_every", "0",
               "--max_length", "64"]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    trained = losses(out)
    assert sorted(trained) == list(range(1, 9)) and trained[8] < trained[1]


@pytest.mark.slow  # several torchrun launches: `make test-all`
def test_muon_under_ddp_and_fsdp_takes_the_steps_of_one_process_and_resumes(recipe, tmp_path):
    muon = ("--train.optimizer", "muon")
    run(recipe, tmp_path / "one", 1, *muon)
    alone = losses(tmp_path / "one")
    assert alone[STEPS] < alone[1] - 1
    run(recipe, tmp_path / "ddp", 2, *muon)
    assert losses(tmp_path / "ddp") == pytest.approx(alone, rel=1e-5)
    out = tmp_path / "fsdp"
    run(recipe, out, 2, "--fsdp", *muon)
    assert losses(out) == pytest.approx(alone, rel=1e-5)
    # Both optimizers' states come back from the step-10 checkpoint, sharded again.
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    run(recipe, out, 2, "--fsdp", "--resume", *muon)
    assert losses(out) == pytest.approx(alone, rel=1e-5)
