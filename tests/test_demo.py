"""`lmforge demo` end to end on the built-in corpus, with a short time budget (slow: `make test-all`)."""

import re
import subprocess
import sys

import pytest

from lmforge.demo import degeneration_table


@pytest.mark.slow
def test_demo_writes_a_report_with_falling_perplexity_and_a_chat_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "demo", "--out", str(tmp_path / "demo")]
        # A step budget, not a time budget, so a loaded machine gets the same model.
        + ["--minutes", "10", "--max-steps", "60", "--chat-minutes", "0.3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")
    before, after = map(float, re.search(r"\| perplexity \| ([\d.]+) \| ([\d.]+) \|", report).groups())
    assert after < before / 2
    assert "bits per character" in report and "![loss](loss.png)" in report
    assert report.count("**") >= 12  # three prompts, sampled and greedy
    assert "## Degeneration" in report and "| greedy |" in report and "Precision: " in report
    for name in ("loss.png", "model.safetensors", "tokenizer.json", "metrics.jsonl", "generation_config.json"):
        assert (tmp_path / "demo" / name).is_file()
    # The chat step: held-out accuracy beside the pretrained model, and a two-turn conversation.
    assert "## Chat fine-tuning" in report and "after chat fine-tuning" in report
    assert report.count("**助手**") == 2
    chat_config = (tmp_path / "demo" / "chat" / "tokenizer_config.json").read_text(encoding="utf-8")
    assert "chat_template" in chat_config


def test_the_degeneration_table_scores_the_continuations_without_their_prompts():
    table = degeneration_table([("中国人民", "今天天气很好")], [("中国人民", "人、人、人、人")])
    assert "| sampled | 1.00 | 0% |" in table  # every pair distinct, no 4-gram repeated
    assert "| greedy | 0.33 | 50% |" in table  # 2 of 6 pairs distinct; 2 of 4 4-grams repeat (tests/test_metrics.py)
