"""DPO: the loss starts at log 2, held-out preference accuracy rises, and the report sets it beside the base."""

import json
import math

import pytest
import torch

from lmforge.config import from_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.models import load_model
from lmforge.tasks import dpo
from lmforge.tasks.base import run_task
from lmforge.tasks.examples import TaskData
from lmforge.train.objectives import dpo_loss


def test_dpo_loss_is_log_two_while_the_policy_equals_the_reference(chat_data, base_run):
    model = load_model(base_run)
    tokenizer = Tokenizer.load(base_run)
    pairs = dpo.encode_pairs(tokenizer, dpo.preference_records(TaskData(source=str(chat_data)), "train")[:8], 64)
    batch = dpo.collate_pairs(pairs, tokenizer.pad_id)
    loss, _ = dpo_loss(model, batch, reference=model, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # Only reply tokens are scored: each row's targets are exactly its reply (ending with <|im_end|>).
    prompt, chosen, rejected = pairs[0]
    assert batch["targets"][0][batch["targets"][0] >= 0].tolist() == chosen
    assert batch["targets"][len(pairs)][batch["targets"][len(pairs)] >= 0].tolist() == rejected
    assert chosen[-1] == rejected[-1] == tokenizer.im_end_id
    # With sft_weight, the chosen replies' mean per-token negative log-likelihood is added (RPO).
    with_sft, _ = dpo_loss(model, batch, reference=model, beta=0.1, sft_weight=0.5)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[: len(pairs)]
    targets = batch["targets"][: len(pairs)]
    per_row = [
        torch.nn.functional.cross_entropy(logits[row], targets[row], ignore_index=-100) for row in range(len(pairs))
    ]
    assert with_sft.item() == pytest.approx(math.log(2) + 0.5 * torch.stack(per_row).mean().item(), abs=1e-5)


def test_dpo_raises_held_out_preference_accuracy(chat_data, base_run, tmp_path):
    recipe = from_dict(
        dpo.Recipe,
        {
            "data": {"source": str(chat_data)},
            "base": str(base_run),
            "beta": 0.5,
            "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20},
            "max_new_tokens": 4,
            "device": "cpu",
        },
    )
    metrics = run_task(dpo.TASK, recipe, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r["valid_preference_accuracy"] for r in records if "valid_preference_accuracy" in r]
    assert curve[-1] >= 0.9 and curve[-1] > curve[0] + 0.3
    base = metrics["baselines"][f"base model before DPO ({base_run})"]
    assert metrics["preference_accuracy"] > base["preference_accuracy"]
    assert metrics["reward_accuracy"] >= 0.9
    report = (tmp_path / "report.md").read_text()
    assert "preference_accuracy.png" in report and (tmp_path / "preference_accuracy.png").is_file()


def test_pairs_must_end_with_a_user_turn(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "messages": [{"role": "assistant", "content": "x"}],
                                           "chosen": "a", "rejected": "b"}])  # fmt: skip
    with pytest.raises(UserError, match="end with a user turn"):
        dpo.preference_records(
            TaskData(source=str(tmp_path / "pairs.jsonl"), valid_fraction=0, test_fraction=0), "train"
        )


def test_beta_must_be_positive():
    with pytest.raises(UserError, match="beta"):
        from_dict(dpo.Recipe, {"beta": 0})
