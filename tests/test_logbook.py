"""The logbook: TensorBoard event files read back equal metrics.jsonl, and a resume shows each step once."""

import sys
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

from lmforge.run_folder import read_jsonl
from lmforge.train.logbook import Logbook, scalars


def train_record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 0.5, "tokens": 64 * step, "elapsed": 0.1}


def valid_record(step: int, loss: float) -> dict:
    return {"step": step, "valid_loss": loss, "valid_perplexity": 2.0**loss}


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in run_dir/tensorboard, as TensorBoard's own reader sees it (purges applied)."""
    keep_every_event = {event_accumulator.SCALARS: 0}
    accumulator = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance=keep_every_event)
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in scalars(record).items():
            series.setdefault(tag, []).append((record["step"], value))
    return series


def assert_same_series(actual, expected):
    assert actual.keys() == expected.keys()
    for tag in expected:
        assert [step for step, _ in actual[tag]] == [step for step, _ in expected[tag]], tag
        # Event files hold float32.
        assert [value for _, value in actual[tag]] == pytest.approx([value for _, value in expected[tag]], rel=1e-6)


def next_second() -> None:
    """Event file names start with the creation second; a resume in the same second could sort first."""
    time.sleep(1.01 - time.time() % 1)


def test_scalars_name_train_and_valid_tags_and_skip_the_rest():
    record = {"step": 3, "loss": 1.5, "tokens_per_second": 100, "valid_loss": 2.0, "note": "x", "nan_guard": True}
    assert scalars(record) == {"train/loss": 1.5, "train/tokens_per_second": 100.0, "valid/loss": 2.0}


def test_event_files_hold_the_metrics_jsonl_records(tmp_path):
    records = [valid_record(0, 9.0)] + [train_record(step, 9.0 - step / 3) for step in range(1, 7)]
    records.insert(4, valid_record(3, 8.1))
    records.append(valid_record(6, 7.2))
    with Logbook(tmp_path, resume_from_step=None) as logbook:
        for record in records:
            logbook.log(record)
    assert read_jsonl(tmp_path / "metrics.jsonl") == records
    events = read_events(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/loss", "valid/perplexity"} <= events.keys()
    assert_same_series(events, expected_series(records))


def test_resume_shows_each_step_once_with_the_redone_values(tmp_path):
    with Logbook(tmp_path, resume_from_step=None) as logbook:
        for step in range(1, 7):  # killed after step 6; the last checkpoint is step 4
            logbook.log(train_record(step, float(step)))
        logbook.log(valid_record(4, 40.0))
        logbook.log(valid_record(6, 60.0))
    next_second()
    with Logbook(tmp_path, resume_from_step=4) as logbook:
        for step in range(5, 9):
            logbook.log(train_record(step, 100.0 + step))
        logbook.log(valid_record(8, 80.0))

    expected = [train_record(step, float(step)) for step in range(1, 5)] + [valid_record(4, 40.0)]
    expected += [train_record(step, 100.0 + step) for step in range(5, 9)] + [valid_record(8, 80.0)]
    assert read_jsonl(tmp_path / "metrics.jsonl") == expected
    events = read_events(tmp_path)
    assert [step for step, _ in events["train/loss"]] == list(range(1, 9))
    assert_same_series(events, expected_series(expected))


def test_a_fresh_start_replaces_the_old_logs(tmp_path):
    with Logbook(tmp_path, resume_from_step=None) as logbook:
        for step in range(1, 4):
            logbook.log(train_record(step, 5.0))
    with Logbook(tmp_path, resume_from_step=None) as logbook:
        logbook.log(train_record(1, 1.0))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [train_record(1, 1.0)]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    assert read_events(tmp_path)["train/loss"] == [(1, 1.0)]


def test_disabled_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with Logbook(run, resume_from_step=None, enabled=False) as logbook:
        logbook.log(train_record(1, 1.0))
    with Logbook(run, resume_from_step=3, enabled=False) as logbook:
        logbook.log(train_record(4, 1.0))
    assert not run.exists()


def test_without_tensorboard_jsonl_still_works_and_a_resume_fills_the_events_in(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
        with Logbook(tmp_path, resume_from_step=None) as logbook:
            for step in range(1, 5):
                logbook.log(train_record(step, float(step)))
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: tensorboard is not installed; logging to metrics.jsonl only"
    ]
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 4

    with Logbook(tmp_path, resume_from_step=3) as logbook:
        logbook.log(train_record(4, 44.0))
    expected = [train_record(step, float(step)) for step in range(1, 4)] + [train_record(4, 44.0)]
    assert read_jsonl(tmp_path / "metrics.jsonl") == expected
    assert_same_series(read_events(tmp_path), expected_series(expected))


def test_a_closed_logbook_refuses_records(tmp_path):
    logbook = Logbook(tmp_path, resume_from_step=None)
    logbook.close()
    logbook.close()
    with pytest.raises(ValueError, match="closed"):
        logbook.log(train_record(1, 1.0))
