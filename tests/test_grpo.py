"""GRPO: the loss is its formula, equal rewards teach nothing, and on a toy task the reward rises."""

import json
import re

import pytest
import torch
from conftest import run_whole_and_in_parts
from safetensors.torch import load_file

from lmforge.config import from_dict
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tasks import grpo
from lmforge.tasks.base import run_task
from lmforge.tasks.dpo import collate_replies
from lmforge.tasks.examples import TaskData
from lmforge.train.objectives import group_advantages, grpo_loss

CJK = re.compile("[\u4e00-\u9fff]")


def _hand_made_group():
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                           max_position_embeddings=32)  # fmt: skip
    model = Decoder(config)
    rows = [([1, 5, 6], [7, 8, 9]), ([1, 5, 6], [10, 2]), ([1, 4], [11, 12, 13, 14]), ([1, 4], [3])]
    batch = collate_replies(rows, pad_id=0)
    generator = torch.Generator().manual_seed(1)
    # Old and reference log-probabilities away from the policy's, so the ratio is clipped on some tokens.
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)
    batch["old_logprobs"] = logprobs + 0.5 * torch.randn(logprobs.shape, generator=generator)
    batch["ref_logprobs"] = logprobs + 0.3 * torch.randn(logprobs.shape, generator=generator)
    batch["advantages"] = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    return model, batch, logprobs


def test_grpo_loss_equals_its_definition_on_a_hand_made_group():
    model, batch, logprobs = _hand_made_group()
    clip, beta = 0.2, 0.1
    loss, tokens = grpo_loss(model, batch, clip=clip, kl_weight=beta)
    expected = 0.0
    for row in range(4):
        advantage, total, count = float(batch["advantages"][row]), 0.0, 0
        for t in range(batch["targets"].shape[1]):
            if batch["targets"][row, t] == IGNORE_INDEX:
                continue
            policy, old, ref = (float(x[row, t]) for x in (logprobs, batch["old_logprobs"], batch["ref_logprobs"]))
            ratio = torch.exp(torch.tensor(policy - old)).item()
            surrogate = min(ratio * advantage, min(max(ratio, 1 - clip), 1 + clip) * advantage)
            kl = torch.exp(torch.tensor(ref - policy)).item() - (ref - policy) - 1
            total, count = total + surrogate - beta * kl, count + 1
        expected -= total / count / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert tokens == int(batch["attention_mask"].sum())
    assert batch["advantages"].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)


def test_equal_rewards_give_zero_advantage_and_no_policy_gradient():
    advantages = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.0, 1.0, 1.0]), group_size=3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert advantages[3:].sum().abs() < 1e-6 and advantages[3] < 0 < advantages[4]
    model, batch, _ = _hand_made_group()
    batch["advantages"] = group_advantages(torch.ones(4), group_size=2)
    loss, _ = grpo_loss(model, batch, kl_weight=0.0)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad.abs().max() == 0 for p in model.parameters() if p.grad is not None)


def test_verifiers_score_replies_and_a_failing_one_is_a_one_line_error(monkeypatch):
    toolbox = grpo.builtin_toolbox()
    record = {"answer": "27", "tools": [{"type": "function", "function": {"name": "calculator"}}],
              "calls": [{"name": "calculator", "arguments": {"expression": "3*9"}}]}  # fmt: skip
    right = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "9*3"}}\n</tool_call>'
    assert grpo.VERIFIERS["tool_call"](right, record, toolbox) == 1.0
    assert grpo.VERIFIERS["tool_call"](right.replace("9*3", "9*4"), record, toolbox) == 0.0
    assert grpo.VERIFIERS["tool_call"]("27", record, toolbox) == 0.0
    assert grpo.VERIFIERS["exact"]("27。", record, toolbox) == 1.0
    assert grpo.VERIFIERS["numeric"]("答案是27.0", record, toolbox) == 1.0

    def broken(reply, record, toolbox):
        raise KeyError("score")

    monkeypatch.setitem(grpo.VERIFIERS, "broken", broken)
    verify = grpo.pick_verifier("broken", TaskData(source="x"), [])
    with pytest.raises(UserError, match="verifier 'broken' failed on a reply to '3乘9': KeyError"):
        verify("27", {**record, "prompt": "3乘9"})


def test_reward_rises_on_a_toy_task(chat_data, base_run, tmp_path, monkeypatch):
    """Toy reward: replies that start with a Chinese character. The tiny base rarely does; GRPO must teach it."""
    monkeypatch.setitem(grpo.VERIFIERS, "toy", lambda reply, record, toolbox: float(bool(CJK.match(reply))))
    recipe = from_dict(grpo.Recipe, {
        "data": {"source": str(chat_data), "max_eval_examples": 8}, "base": str(base_run), "verifier": "toy",
        "train": {"max_steps": 24, "batch_size": 16, "lr": 1e-2, "eval_every": 8, "save_every": 24},
        "group_size": 8, "max_new_tokens": 2, "temperature": 1.0, "device": "cpu", "oversample": 2,
    })  # fmt: skip
    metrics = run_task(grpo.TASK, recipe, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["valid_reward"] for r in records if "valid_reward" in r]
    assert len(rewards) == 3 and rewards[-1] > rewards[0] + 0.1, rewards
    start = metrics["baselines"][f"starting model ({base_run})"]
    assert metrics["accuracy"] > start["accuracy"] and metrics["kl"] > 0
    assert (tmp_path / "grpo_rewards.png").is_file() and "exact match" in (tmp_path / "report.md").read_text()


def test_oversampling_trains_on_the_groups_whose_rewards_differ_first():
    sampler = grpo.GroupSampler.__new__(grpo.GroupSampler)
    sampler.recipe = from_dict(grpo.Recipe, {"group_size": 2, "oversample": 3, "train": {"batch_size": 4}})
    rewards = [1, 1, 0, 1, 0, 0, 1, 0, 0.5, 0.2, 1, 1]  # groups 1, 3 and 4 differ
    sampler.groups = 2
    assert sampler._kept_groups(rewards) == [1, 3]
    sampler.groups = 4  # too few informative groups: the first others fill the batch
    assert sampler._kept_groups(rewards) == [0, 1, 3, 4]
    sampler.groups = 6
    assert sampler._kept_groups(rewards) == list(range(6))


@pytest.mark.slow
def test_a_run_resumed_on_a_group_boundary_equals_an_uninterrupted_one(chat_data, base_run, tmp_path, monkeypatch):
    monkeypatch.setitem(grpo.VERIFIERS, "toy", lambda reply, record, toolbox: float(bool(CJK.match(reply))))

    def recipe(steps: int):
        return from_dict(grpo.Recipe, {
            "data": {"source": str(chat_data), "max_eval_examples": 4}, "base": str(base_run), "verifier": "toy",
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "min_lr_ratio": 1.0,
                      "eval_every": 0, "save_every": 2},
            "group_size": 4, "max_new_tokens": 2, "device": "cpu",
        })  # fmt: skip

    run_whole_and_in_parts(grpo.TASK, recipe, tmp_path)
    whole, parts = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "parts"))
    assert all(torch.equal(whole[key], parts[key]) for key in whole)
