"""The CLI end to end on a small local corpus: user errors are one line with exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest

import lmforge

CORPUS = [
    "新华社北京一月一日电，国家主席发表新年讲话，祝愿全国各族人民新年快乐。",
    "今年经济工作的主要任务是稳定增长，深化改革，扩大开放，改善人民生活。",
    "中国人民在新的一年里将继续努力，建设富强民主文明的现代化国家。",
    "The People's Daily is a newspaper published in Beijing.",
]


def lmforge_cli(*arguments, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *arguments], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder made through the CLI: a tiny tokenizer and a few pretraining steps on a local file."""
    folder = tmp_path_factory.mktemp("cli")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"{line}（第{index}段）" for index in range(300) for line in CORPUS), encoding="utf-8")
    result = lmforge_cli(
        "pretrain",
        "--data",
        str(corpus),
        "--out",
        str(folder / "run"),
        "--max-steps",
        "30",
        "--data.vocab_size",
        "400",
        "--data.context",
        "32",
        "--data.valid_fraction",
        "0.05",
        "--model.hidden_size",
        "32",
        "--model.num_layers",
        "2",
        "--model.num_heads",
        "2",
        "--model.intermediate_size",
        "64",
        "--model.max_position_embeddings",
        "32",
        "--train.batch_size",
        "8",
        "--train.eval_every",
        "10",
        "--train.eval_windows",
        "8",
        "--train.warmup_steps",
        "5",
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    return folder / "run", corpus


def test_pretrain_writes_a_complete_run_folder(trained_run):
    run, _ = trained_run
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert valid[-1] < valid[0]
    # The report and metrics.json say how it trained: precision auto, decided here by the CPU probe.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"].startswith(("fp32 (auto: bf16 matmul", "bf16 (auto: bf16 matmul"))
    assert metrics["optimizer"].startswith("AdamW")
    assert f"Trained in {metrics['precision']} with AdamW" in (run / "report.md").read_text(encoding="utf-8")


def test_generate_and_python_api_agree(trained_run):
    run, _ = trained_run
    result = lmforge_cli("generate", "--model", str(run), "新华社", "--temperature", "0", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = lmforge.load(run).generate("新华社", temperature=0, max_new_tokens=12)
    assert result.stdout.strip() == ("新华社" + expected).strip()


def test_eval_prints_one_json_line(trained_run):
    run, corpus = trained_run
    result = lmforge_cli("eval", "--model", str(run), "--data", str(corpus), "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    assert numbers["perplexity"] > 1 and 0 < numbers["bits_per_byte"] < numbers["bits_per_char"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["eval", "--model", "no-such-run"], "no-such-run"),
        (["tokenizer", "train", "--data", "builtin:nope", "--out", "x"], "builtin:peoples-daily"),
        (["tokenizer", "train", "--data", "missing.txt", "--out", "x"], "missing.txt"),
        (["pretrain", "--train.nonsense", "1"], "train.nonsense"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(arguments, message, tmp_path):
    result = lmforge_cli(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_finetune_and_eval_a_task_through_the_cli(tmp_path):
    data = tmp_path / "reviews"
    data.mkdir()
    for split in ("train", "valid", "test"):
        rows = [{"text": f"{line}很好", "label": 1} for line in CORPUS] + [
            {"text": f"{line}太差", "label": 0} for line in CORPUS
        ]
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows * 5), encoding="utf-8"
        )
    tiny = ["--vocab_size", "300", "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2"]
    run = str(tmp_path / "run")
    result = lmforge_cli("finetune", "--task", "sentiment", "--data", str(data), "--out", run, "--max-steps=2", *tiny)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "baseline majority class" in result.stdout
    result = lmforge_cli(
        "eval", "--task", "sentiment", "--model", str(tmp_path / "run"), "--data", str(data), "--split", "valid",
        "--json", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["examples"] == 40
    assert (tmp_path / "eval" / "report.md").is_file()
    # Without --out the report goes to a folder of its own: the run's own report.md is never overwritten.
    own_report = (tmp_path / "run" / "report.md").read_bytes()
    result = lmforge_cli("eval", "--task", "sentiment", "--model", run, "--data", str(data), "--split", "valid")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "eval-sentiment-valid" / "report.md").is_file()
    assert (tmp_path / "run" / "report.md").read_bytes() == own_report


def test_summarize_through_the_cli_prints_the_difference_from_the_lead(tmp_path):
    data = tmp_path / "posts"
    data.mkdir()
    rows = [{"document": line, "summary": line[:8]} for line in CORPUS[:3]] * 10
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
        )
    tiny = [
        "--vocab_size", "300", "--model.hidden_size", "32", "--model.num_encoder_layers", "1",
        "--model.num_decoder_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
        "--max_target_length", "12", "--num_beams", "2",
    ]  # fmt: skip
    run = str(tmp_path / "run")
    result = lmforge_cli("finetune", "--task", "summarize", "--data", str(data), "--out", run, "--max-steps=2", *tiny)
    assert result.returncode == 0, result.stderr
    assert "baseline lead: rouge1" in result.stdout
    assert "model minus lead, rougeL:" in result.stdout and "95% interval" in result.stdout
    assert "\nbeam search (2): rouge1 " in result.stdout
    result = lmforge_cli("eval", "--task", "summarize", "--model", run, "--data", str(data), "--mbr-samples", "3")
    assert result.returncode == 0, result.stderr
    assert "MBR over 3 samples: rouge1 " in result.stdout and "model minus lead, rougeL:" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["finetune", "--task", "sentimnet", "--out", "x"], "unknown task 'sentimnet'"),
        (["finetune", "--task", "mcq", "--out", "x"], "evaluation-only"),
        (["finetune", "--task", "sentiment", "--out", "x", "--data", "nowhere.jsonl"], "no such data file"),
        (["eval", "--task", "sentiment", "--model", "nowhere"], "nowhere"),
        (["finetune", "--task", "sentiment", "--out", "x", "--base", "builtin:gpt5"], "unknown built-in model"),
    ],
)
def test_task_mistakes_are_one_line_errors(arguments, message, tmp_path):
    result = lmforge_cli(*arguments, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
