"""`lmforge runs` over fake run folders: finished, running, stopped, damaged, nested, and the CLI's table and JSON."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import UserError
from lmforge.runs import list_runs

HOUR = 3600.0
NEWEST_FIRST = ["live", "stopped", "sum", "demo/chat", "sum/warm-up", "demo", "damaged", "unreadable", "empty"]


def write_run(
    folder,
    steps=0,
    valid=(),
    max_steps=None,
    family=None,
    task=None,
    lora=False,
    model=False,
    report=False,
    checkpoints=(),
    extra_lines=(),
):
    """A run folder as training leaves it; the weights are placeholder bytes (listing never reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "valid_loss": 9.0})] if valid else []
    for step in range(1, steps + 1):
        lines.append(json.dumps({"step": step, "loss": 10.0 - step, "lr": 0.001}))
        if step in valid:
            lines.append(json.dumps({"step": step, "valid_loss": valid[step], "valid_perplexity": 2.0}))
    lines += extra_lines
    if lines:
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if max_steps is not None:
        (folder / "recipe.json").write_text(json.dumps({"train": {"max_steps": max_steps}}))
    if family is not None:
        (folder / "config.json").write_text(json.dumps({"family": family}))
    if task is not None:
        (folder / "task.json").write_text(json.dumps({"task": task}))
    if lora:
        (folder / "adapter_config.json").write_text("{}")
    if model:
        (folder / "model.safetensors").write_bytes(b"weights")
    if report:
        (folder / "report.md").write_text("# report\n")
    for step, complete in checkpoints:
        checkpoint = folder / "checkpoints" / f"step_{step:08d}"
        checkpoint.mkdir(parents=True)
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
    return folder


def age(folder, seconds, now, **later):
    """Date everything in `folder` `seconds` ago; `later` dates single entries (name=seconds ago) differently."""
    for entry in [folder, *folder.iterdir()]:
        os.utime(entry, (now - seconds, now - seconds))
    for name, entry_seconds in later.items():
        os.utime(folder / name.replace("__", "."), (now - entry_seconds, now - entry_seconds))


@pytest.fixture
def runs(tmp_path):
    """One folder of runs in every state; returns (root, now)."""
    now = time.time()
    root = tmp_path / "runs"
    demo = write_run(root / "demo", 4, {2: 6.5, 4: 6.0}, max_steps=6, family="decoder", model=True)
    chat = write_run(demo / "chat", 3, {3: 4.0}, family="decoder", task="chat", lora=True, model=True, report=True)
    age(chat, 2 * HOUR, now)
    # Stopped by its time budget at step 4 of 6, then saved: a model newer than the last metrics line means finished.
    age(demo, 3 * HOUR, now, model__safetensors=3 * HOUR - 1)

    write_run(root / "live", 5)
    age(root / "live", 10, now)

    stopped = write_run(root / "stopped", 7, {5: 7.5}, checkpoints=[(5, True), (6, False)])
    age(stopped, HOUR, now)
    age(stopped / "checkpoints", HOUR, now)

    torn = ['{"step": 3, "loss": 1.0}', "[1, 2]", '{"step": 4, "lo']
    damaged = write_run(root / "damaged", 2, {2: 8.0}, extra_lines=torn)
    (damaged / "recipe.json").write_text("{not json")
    age(damaged, 5 * HOUR, now)

    summarize = write_run(root / "sum", 4, {4: 5.0}, max_steps=4, family="seq2seq", task="summarize", model=True)
    write_run(summarize / "warm-up", 6, checkpoints=[(6, True)])
    age(summarize / "warm-up", 2 * HOUR, now)
    age(summarize, HOUR, now)

    unreadable = root / "unreadable"
    (unreadable / "metrics.jsonl").mkdir(parents=True)  # reading it fails even for root
    age(unreadable, 6 * HOUR, now)

    write_run(root / "empty", family="decoder")
    age(root / "empty", 7 * HOUR, now)
    return root, now


def by_name(root, now):
    return {summary.name: summary for summary in list_runs(root, now=now)}


def test_finished_runs_report_step_best_valid_loss_and_kind(runs):
    summaries = by_name(*runs)
    demo = summaries["demo"]
    assert (demo.kind, demo.status, demo.step, demo.max_steps) == ("pretrain", "finished", 4, 6)
    assert (demo.best_valid_loss, demo.best_valid_step, demo.last_loss) == (6.0, 4, 6.0)
    chat = summaries["demo/chat"]
    assert (chat.kind, chat.status, chat.step, chat.max_steps) == ("chat LoRA", "finished", 3, None)
    assert (chat.best_valid_loss, chat.best_valid_step) == (4.0, 3)
    assert summaries["sum"].kind == "summarize"


def test_a_phase_without_a_model_is_done_once_its_parent_logs_after_it(runs):
    warm_up = by_name(*runs)["sum/warm-up"]
    assert (warm_up.kind, warm_up.status) == ("summarize warm-up", "finished")
    assert (warm_up.step, warm_up.checkpoint_step) == (6, 6)


def test_running_stopped_and_empty(runs):
    summaries = by_name(*runs)
    assert summaries["live"].status == "running"
    stopped = summaries["stopped"]
    # step_00000006 has no trainer_state.json: it was never completed, so --resume would use step 5.
    assert (stopped.status, stopped.step, stopped.checkpoint_step, stopped.kind) == ("stopped", 7, 5, None)
    assert (stopped.best_valid_loss, stopped.best_valid_step) == (7.5, 5)
    assert summaries["empty"].status == "empty"


def test_a_resumed_finished_run_is_running_again(runs):
    root, now = runs
    (root / "demo" / "metrics.jsonl").open("a").write(json.dumps({"step": 5, "loss": 0.5}) + "\n")
    os.utime(root / "demo" / "metrics.jsonl", (now - 5, now - 5))
    assert by_name(root, now)["demo"].status == "running"


def test_a_soup_is_running_while_its_later_members_log_and_they_are_not_runs_of_their_own(runs):
    root, now = runs
    soup = write_run(root / "soup", 6, max_steps=6, task="qa")  # member 0 done, no model yet
    member = write_run(soup / "members" / "1", 2, max_steps=6)
    age(soup, HOUR, now)
    age(member, HOUR, now)
    summaries = by_name(root, now)
    assert summaries["soup"].status == "stopped" and "soup/members/1" not in summaries
    os.utime(member / "metrics.jsonl", (now - 5, now - 5))
    assert by_name(root, now)["soup"].status == "running"


def test_damaged_files_show_as_unknown_and_the_listing_carries_on(runs):
    summaries = by_name(*runs)
    damaged = summaries["damaged"]
    assert (damaged.status, damaged.step, damaged.max_steps, damaged.last_loss) == ("stopped", 3, None, 1.0)
    assert damaged.problems[0] == "2 unreadable lines in metrics.jsonl skipped"
    assert damaged.problems[1].startswith("cannot read recipe.json")
    unreadable = summaries["unreadable"]
    assert (unreadable.status, unreadable.step) == ("?", None)
    assert unreadable.problems[0].startswith("cannot read metrics.jsonl")


def test_listing_is_newest_first_and_skips_checkpoint_and_tensorboard_folders(runs):
    root, now = runs
    (root / "stopped" / "tensorboard").mkdir()
    (root / "stopped" / "checkpoints" / "step_00000005" / "config.json").write_text("{}")
    age(root / "stopped", HOUR, now)
    names = [summary.name for summary in list_runs(root, now=now)]
    assert names == NEWEST_FIRST


def test_a_run_folder_itself_can_be_listed(runs):
    root, now = runs
    assert [summary.name for summary in list_runs(root / "stopped", now=now)] == ["."]


def test_cli_prints_an_aligned_table_with_notes(runs):
    root, _ = runs
    result = CliRunner().invoke(app, ["runs", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["RUN", "KIND", "STEP", "BEST", "VALID", "LOSS", "LAST", "LOSS", "MODIFIED", "STATUS"]
    assert [line.split()[0] for line in lines[1:10]] == NEWEST_FIRST
    rows = {line.split()[0]: line for line in lines[1:10]}
    assert "4/6" in rows["demo"] and "6.0000 @ 4" in rows["demo"] and rows["demo"].endswith("finished")
    assert rows["stopped"].endswith("stopped (checkpoint at step 5: resume with --resume)")
    assert rows["live"].endswith("running")
    assert rows["unreadable"].split()[1:3] == ["?", "?"]
    # Columns line up: every row's status starts where the header's does.
    status_column = lines[0].index("STATUS")
    assert all(line[status_column - 2 : status_column] == "  " for line in lines[1:10])
    assert "note: damaged: 2 unreadable lines in metrics.jsonl skipped" in lines


def test_cli_json_has_every_run(runs):
    root, _ = runs
    result = CliRunner().invoke(app, ["runs", str(root), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    demo = next(run for run in listed if run["name"] == "demo")
    assert demo == {
        "name": "demo",
        "kind": "pretrain",
        "status": "finished",
        "step": 4,
        "max_steps": 6,
        "best_valid_loss": 6.0,
        "best_valid_step": 4,
        "last_loss": 6.0,
        "checkpoint_step": None,
        "modified": pytest.approx(demo["modified"]),
        "problems": [],
    }
    assert len(listed) == 9


def test_cli_on_a_missing_or_empty_folder(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0 and result.output.strip() == f"no run folders under {tmp_path}"
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, UserError)  # main() prints it as one line
