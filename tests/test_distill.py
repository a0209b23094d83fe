"""Distillation: the soft-target loss matches its definition, and a student learns from a teacher."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks import distill
from lmforge.tasks.base import run_task
from lmforge.train.objectives import distillation_loss


def tiny(hidden: int, seed: int) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=50, hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=32))


def test_distillation_loss_is_the_weighted_kl_plus_cross_entropy():
    student, teacher = tiny(16, 0), tiny(32, 1)
    inputs = torch.randint(0, 50, (2, 12))
    targets = torch.randint(0, 50, (2, 12))
    loss, tokens = distillation_loss(student, (inputs, targets), teacher, temperature=2.0, alpha=0.3)
    p_teacher = F.softmax(teacher(inputs) / 2.0, dim=-1)
    log_student = F.log_softmax(student(inputs) / 2.0, dim=-1)
    kl = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean()
    cross_entropy = F.cross_entropy(student(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, 0.3 * 4.0 * kl + 0.7 * cross_entropy, atol=1e-5, rtol=1e-5)
    assert tokens == 24
    # A student identical to its teacher has nothing left to learn from the soft targets.
    same, _ = distillation_loss(teacher, (inputs, targets), teacher, temperature=2.0, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_a_student_distilled_from_a_teacher_beats_its_own_start(tmp_path, write_jsonl, base_run):
    texts = [{"text": f"第{i}句：" + "红绿蓝黄" * (1 + i % 5) + "。今天天气很好，明天下雨。" * 3} for i in range(1000)]
    write_jsonl(tmp_path / "text.jsonl", texts)
    recipe = from_dict(
        distill.Recipe,
        {
            "data": {"source": str(tmp_path / "text.jsonl")},
            "teacher": str(base_run),
            "context": 32,
            "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
            "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 30},
            "eval_windows": 8,
            "device": "cpu",
        },
    )
    metrics = run_task(distill.TASK, recipe, tmp_path / "student", progress=False)
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert metrics["size_ratio"] < 0.5 and math.isfinite(metrics["speedup"])
    assert "teacher" in (tmp_path / "student" / "report.md").read_text()


def test_distillation_needs_a_teacher(tmp_path):
    with pytest.raises(UserError, match="--teacher"):
        run_task(distill.TASK, from_dict(distill.Recipe, {}), tmp_path, progress=False)
