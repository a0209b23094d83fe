"""Code task: corpus reading, FIM documents, line-completion metrics and baselines, the sandbox, pass@k, a tiny run."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import from_dict
from lmforge.data.code import (
    STDLIB,
    CodeFile,
    fim_prompt_ids,
    fim_span,
    line_chunks,
    python_files,
    training_ids,
)
from lmforge.data.tokenizer import FIM_TOKENS, Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate import code_completion as completion
from lmforge.evaluate.execution import Limits, run_program
from lmforge.evaluate.metrics import edit_similarity, pass_at_k
from lmforge.tasks import code
from lmforge.tasks.base import run_task

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "code" / "humaneval.jsonl"
needs_humaneval = pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"shared data set absent: {HUMANEVAL}")

SOURCE = '''import os


def greet(name):
    """Say hello 你好."""
    if name:
        return "hello " + name
    return "hello"


class Box:
    def __init__(self, value):
        self.value = value
'''


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([SOURCE] * 30, 330, show_progress=False, fill_in_the_middle=True)


def test_corpus_counts_empty_binary_and_invalid_files(tmp_path):
    (tmp_path / "good.py").write_text(SOURCE)
    (tmp_path / "empty.py").write_text("  \n")
    (tmp_path / "binary.py").write_bytes(b"\x00\x01\x02")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "skip.py").write_text("x = 1\n")
    corpus = python_files(str(tmp_path))
    assert sorted(file.path for file in corpus.files) == ["broken.py", "good.py"]  # invalid Python is kept
    assert corpus.counts == {"files_seen": 4, "empty": 1, "binary": 1, "invalid_python": 1, "valid_python": 1}
    (tmp_path / "good.py").unlink()
    (tmp_path / "broken.py").unlink()
    with pytest.raises(UserError, match="no usable .py file: 2 files seen, 1 empty, 1 binary"):
        python_files(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        python_files(str(tmp_path / "missing"))


def test_stdlib_is_found_and_parses():
    corpus = python_files(STDLIB, max_files=20)
    assert len(corpus.files) == 20 and all(file.path.endswith(".py") for file in corpus.files)
    assert sum(file.parses for file in corpus.files) >= 19


def test_code_tokenizer_keeps_indentation_and_fim_tokens(tokenizer, tmp_path):
    assert tokenizer.fim_ids == tuple(tokenizer.backend.token_to_id(name) for name in FIM_TOKENS)
    assert tokenizer.decode(tokenizer.encode(SOURCE)) == SOURCE
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("        return value\n")]
    assert any(piece.strip() == "" and len(piece) >= 4 for piece in pieces), pieces  # a run of spaces is one token
    tokenizer.save(tmp_path)
    assert Tokenizer.load(tmp_path).fim_ids == tokenizer.fim_ids
    plain = Tokenizer.train([SOURCE] * 30, 330, show_progress=False)
    assert plain.fim_ids is None
    with pytest.raises(UserError, match="not trained with FIM"):
        fim_prompt_ids(plain, "a", "b")


def test_fim_documents_hold_the_whole_text_in_psm_or_spm_order(tokenizer):
    prefix_id, suffix_id, middle_id = tokenizer.fim_ids
    orders = set()
    for seed in range(40):
        ids = training_ids(tokenizer, SOURCE, np.random.default_rng(seed), fim_rate=1.0, spm_rate=0.5)
        assert ids[0] == tokenizer.bos_id and ids[1] == prefix_id and ids[-1] == tokenizer.eos_id
        spm = ids[2] == suffix_id
        orders.add(spm)
        body = ids[2:-1]
        m = body.index(middle_id)
        s = body.index(suffix_id)
        if spm:  # <fim_prefix> <fim_suffix> S <fim_middle> P M
            text = tokenizer.decode(body[m + 1 :]) + tokenizer.decode(body[1:m])
        else:  # <fim_prefix> P <fim_suffix> S <fim_middle> M
            text = tokenizer.decode(body[:s]) + tokenizer.decode(body[m + 1 :]) + tokenizer.decode(body[s + 1 : m])
        assert sorted(text) == sorted(SOURCE)  # every character once, whatever the cut
    assert orders == {True, False}
    plain = training_ids(tokenizer, SOURCE, np.random.default_rng(0), fim_rate=0.0, spm_rate=0.5)
    assert plain == tokenizer.encode(SOURCE, add_bos=True, add_eos=True)


def test_line_middles_are_whole_lines_and_random_ones_are_not_always():
    lines_only, characters = set(), set()
    for seed in range(60):
        start, end = fim_span(SOURCE, np.random.default_rng(seed), line_rate=1.0)
        # A middle starts at a line's start and ends before a newline (or at the end), spanning 1-3 lines.
        assert (start == 0 or SOURCE[start - 1] == "\n") and (end == len(SOURCE) or SOURCE[end] == "\n")
        lines_only.add(SOURCE[start:end].count("\n") + 1)
        start, end = fim_span(SOURCE, np.random.default_rng(seed), line_rate=0.0)
        characters.add((start == 0 or SOURCE[start - 1] == "\n") and (end == len(SOURCE) or SOURCE[end] == "\n"))
    assert lines_only == {1, 2, 3}
    assert False in characters


def test_line_chunks_cover_the_file_within_the_limit(tokenizer):
    text = SOURCE * 5
    chunks = line_chunks(tokenizer, text, 40)
    assert "".join(chunks) == text
    assert all(len(tokenizer.encode(chunk)) <= 40 for chunk in chunks)


def test_edit_similarity_and_pass_at_k_against_hand_values():
    assert edit_similarity("abc", "abd") == pytest.approx(200 * 2 / 6)
    assert edit_similarity("", "") == 100 and edit_similarity("abc", "") == 0
    assert edit_similarity("return x", "return x") == 100
    assert edit_similarity("kitten", "sitting") == pytest.approx(200 * 4 / 13)  # LCS "ittn"
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 5) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))


def test_line_examples_baselines_and_parse_check():
    files = [CodeFile("a.py", SOURCE, True)]
    examples = completion.line_examples(files, 100)
    for example in examples:
        assert example.with_line(example.target) == SOURCE
        # The prompt ends at the line's start: a prompt ending in the indentation ends on a token that never
        # precedes a word in training (the tokenizer joins a word to the space before it).
        assert example.before.endswith("\n") or not example.before
    scores = completion.score_lines(examples, [e.target for e in examples])
    assert scores["exact_match"] == [1.0] * len(examples) and scores["parses"] == [1.0] * len(examples)
    broken = completion.score_lines(examples, ["(" for _ in examples])
    assert broken["parses"] == [0.0] * len(examples)
    training = [CodeFile("b.py", "if x:\n    pass\nif y:\n    pass\nfor z in w:\n    break\n", True)]
    baselines = completion.baseline_lines(examples, training)
    after_colon = [p for e, p in zip(examples, baselines["most frequent next line"]) if e.previous.endswith(":")]
    assert after_colon and set(after_colon) == {"pass"}
    assert baselines["previous line"] == [e.previous for e in examples]


def test_sandbox_limits_time_memory_files_and_environment():
    started = time.perf_counter()
    assert run_program("while True:\n    pass\n", Limits(seconds=1)).status == "timeout"
    assert time.perf_counter() - started < 5
    allowed = "{'PATH', 'LANG', 'PYTHONDONTWRITEBYTECODE', 'LC_CTYPE'}"
    check = f"import os\nassert os.listdir('.') == []\nassert set(os.environ) <= {allowed}\n"
    assert run_program(check).passed
    assert not run_program("x = bytearray(2 * 1024**3)\n", Limits(memory_mb=256)).passed
    assert "File too large" in run_program("open('f', 'wb').write(b'0' * 4 * 2**20)\n", Limits(file_size_mb=1)).detail


@needs_humaneval
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    problems = completion.read_problems(HUMANEVAL)[:8]
    canonical = completion.check_completions(problems, [[p["canonical_solution"]] for p in problems], Limits())
    assert completion.pass_at_ks(canonical) == {"pass@1": 1.0}
    broken = completion.check_completions(problems, [["    return None\n"] for _ in problems], Limits())
    assert completion.pass_at_ks(broken) == {"pass@1": 0.0}
    mixed = completion.check_completions(problems[:2], [[p["canonical_solution"], "    pass\n"] for p in problems[:2]],
                                         Limits())  # fmt: skip
    assert completion.pass_at_ks(mixed, ks=(1, 2)) == {"pass@1": 0.5, "pass@2": 1.0}


def test_humaneval_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(UserError, match="lacks the HumanEval fields"):
        completion.read_problems(bad)
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="is not JSON"):
        completion.read_problems(bad)


def test_tiny_code_run_trains_and_reports_with_baselines(tmp_path):
    for number in range(12):
        (tmp_path / f"module_{number}.py").write_text(SOURCE.replace("greet", f"greet_{number}") * (1 + number % 3))
    recipe = from_dict(code.Recipe, {
        "data": {"source": str(tmp_path), "valid_fraction": 0.25, "test_fraction": 0.25, "max_eval_examples": 24},
        "corpus": {"vocab_size": 330, "context": 64, "fim_rate": 0.5},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 6, "warmup_steps": 1},
        "max_new_tokens": 8, "device": "cpu",
    })  # fmt: skip
    metrics = run_task(code.TASK, recipe, tmp_path / "run", progress=False)
    for key in ("exact_match", "edit_similarity", "parses", "fim_exact_match", "fim_parses"):
        assert 0 <= metrics[key] <= 100
    assert set(metrics["baselines"]) == {"previous line", "most frequent next line"}
    interval = metrics["intervals"]["edit_similarity"]
    assert interval["low"] <= metrics["edit_similarity"] <= interval["high"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "baseline: previous line" in report and "Characters per token" in report


def test_cli_refuses_to_run_code_without_the_flag(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "eval", "--task", "code", "--model", str(tmp_path), "--data", str(problems)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "add --allow-code-execution" in result.stderr
    assert "Traceback" not in result.stderr
