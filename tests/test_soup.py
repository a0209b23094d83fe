"""Model soups: members trained from one start on their own data, averaged; resumable member by member."""

import json

import pytest
import torch
from test_trainer import tiny_setup

from lmforge.errors import UserError
from lmforge.train import soup as soup_module
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.soup import train_soup
from lmforge.train.trainer import train


def soup(run_dir, resume=False, perturb=False, **changes):
    model, windows, config = tiny_setup(steps=6, grad_accum=2, soup=3, **changes)
    if perturb:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
    batch_for = lambda index: windows.training_batch(index, config.batch_size)  # noqa: E731
    train_soup(model, causal_lm_loss, batch_for, config, run_dir, resume=resume, progress=False)
    return model.state_dict()


def losses(run_dir):
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [record["loss"] for record in records if "loss" in record]


def member(run_dir, number):
    """Member `number` trained on its own, as a plain run reading the batch stream from its stretch on."""
    model, windows, config = tiny_setup(steps=6, grad_accum=2)
    offset = number * config.max_steps * config.grad_accum
    batch_for = lambda index: windows.training_batch(offset + index, config.batch_size)  # noqa: E731
    train(model, causal_lm_loss, batch_for, config, run_dir, progress=False)
    return model.state_dict()


def test_a_soup_ends_with_the_mean_of_its_members_each_trained_from_the_start_on_its_own_data(tmp_path):
    souped = soup(tmp_path / "soup")
    members = [member(tmp_path / f"member{number}", number) for number in range(3)]

    for name, tensor in souped.items():
        mean = sum(state[name] for state in members) / 3
        torch.testing.assert_close(tensor, mean, rtol=1e-5, atol=1e-6)
    # The members differ (their own data), so the mean is not any one of them.
    assert not torch.equal(members[0]["embed_tokens.weight"], members[1]["embed_tokens.weight"])
    assert not torch.equal(members[1]["embed_tokens.weight"], members[2]["embed_tokens.weight"])
    # Member 0 is the run itself: its log is the run folder's; the others train in members/k.
    assert losses(tmp_path / "soup") == losses(tmp_path / "member0")
    assert losses(tmp_path / "soup" / "members" / "2") == losses(tmp_path / "member2")
    assert (tmp_path / "soup" / "members" / "1" / "checkpoints").is_dir()


def test_a_resumed_soup_skips_finished_members_and_equals_an_uninterrupted_one(tmp_path):
    uninterrupted = soup(tmp_path / "full")
    # Every member cut short after its first step by a time budget, then resumed by a fresh process.
    soup(tmp_path / "cut", max_minutes=1e-9)
    resumed = soup(tmp_path / "cut", resume=True)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_members_not_yet_started_when_a_soup_is_resumed_start_from_the_saved_start(tmp_path, monkeypatch):
    uninterrupted = soup(tmp_path / "full")
    # Killed once member 0 is done; the resuming process draws other weights (as an unseeded new head would).
    members = []

    def killed_after_member_0(*args, **kwargs):
        if members:
            raise KeyboardInterrupt
        members.append(train(*args, **kwargs))

    monkeypatch.setattr(soup_module, "train", killed_after_member_0)
    with pytest.raises(KeyboardInterrupt):
        soup(tmp_path / "cut")
    monkeypatch.undo()
    resumed = soup(tmp_path / "cut", resume=True, perturb=True)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_a_soup_refuses_sharded_weights_and_needs_one_member_or_more(tmp_path):
    with pytest.raises(UserError, match="fsdp"):
        soup(tmp_path, fsdp=True)
    with pytest.raises(ValueError, match="soup"):
        tiny_setup(soup=0)
