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


@pytest.mark.slow  # end to end through subprocesses: `make test-all` (keeps `make test` under 10 minutes)
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
    # --baselines none skips them, and the output and the report say so.
    result = lmforge_cli(
        "eval", "--task", "sentiment", "--model", run, "--data", str(data), "--baselines", "none",
        "--out", str(tmp_path / "bare"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "baselines skipped" in result.stdout and "baseline majority class" not in result.stdout
    assert "Baselines were skipped" in (tmp_path / "bare" / "report.md").read_text(encoding="utf-8")


def test_a_failed_pretrain_leaves_no_files_behind(tmp_path):
    corpus = tmp_path / "one-line.txt"
    corpus.write_text("".join(CORPUS) * 40 + "\n", encoding="utf-8")  # one record: it all hashes into train
    result = lmforge_cli("pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--data.vocab_size", "300")
    assert result.returncode == 2, result.stderr
    assert "all 1 records" in result.stderr and "fell in the training split" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one-line.txt"]


@pytest.mark.slow  # end to end through subprocesses: `make test-all` (keeps `make test` under 10 minutes)
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
        (["finetune", "--task", "sentiment", "--out", "x", "--baselines", "some"], "--baselines takes all or none"),
        (["eval", "--task", "summarize", "--model", "x", "--baselines", "none"], "not summarize"),
    ],
)
def test_task_mistakes_are_one_line_errors(arguments, message, tmp_path):
    result = lmforge_cli(*arguments, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def one_line_error(result, *messages):
    """A user error: exit code 2, one `error:` line on stderr that holds every message, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(message in lines[0] for message in messages), lines[0]


@pytest.fixture(scope="module")
def hf_folder(trained_run, tmp_path_factory):
    """The trained run exported as a Hugging Face folder."""
    run, _ = trained_run
    out = tmp_path_factory.mktemp("hf") / "llama"
    result = lmforge_cli("export", "--model", str(run), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def edited_copy(folder, target, **changes):
    """A copy of `folder` whose config.json has `changes` applied."""
    import shutil

    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize(
    ("changes", "messages"),
    [
        ({"num_attention_heads": 0}, ["num_attention_heads must be positive, not 0"]),
        ({"hidden_size": "wide"}, ["hidden_size must be int, not 'wide'"]),
        ({"max_position_embeddings": -5}, ["max_position_embeddings must be positive, not -5"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads 2 must be divisible by num_key_value_heads 3"]),
    ],
)
def test_import_of_a_bad_config_names_the_field(hf_folder, tmp_path, changes, messages):
    bad = edited_copy(hf_folder, tmp_path / "bad", **changes)
    one_line_error(lmforge_cli("import", "--from", str(bad), "--out", str(tmp_path / "run")), "config.json", *messages)


@pytest.mark.slow  # end to end through subprocesses: `make test-all` (keeps `make test` under 10 minutes)
def test_a_billion_positions_import_and_generate_without_allocating_them(hf_folder, tmp_path):
    huge = edited_copy(hf_folder, tmp_path / "huge", max_position_embeddings=10**9)
    assert lmforge_cli("import", "--from", str(huge), "--out", str(tmp_path / "run")).returncode == 0
    result = lmforge_cli("generate", "--model", str(tmp_path / "run"), "新华社", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr


def test_generate_on_weights_that_do_not_fit_the_config_names_the_tensor(trained_run, tmp_path):
    run, _ = trained_run
    bad = edited_copy(run, tmp_path / "bad", intermediate_size=48)
    result = lmforge_cli("generate", "--model", str(bad), "新华社")
    one_line_error(result, "does not fit its config.json", "mlp.", "has shape (", "the config implies (")


def test_import_of_an_lmforge_run_folder_says_so(trained_run, tmp_path):
    run, _ = trained_run
    result = lmforge_cli("import", "--from", str(run), "--out", str(tmp_path / "run"))
    one_line_error(result, "already an lmforge run folder")


def test_generate_on_a_hugging_face_folder_suggests_import(hf_folder):
    one_line_error(lmforge_cli("generate", "--model", str(hf_folder), "新华社"), "lmforge import --from")


@pytest.mark.parametrize("content", ["", "  \n\n\t\n", '{"text": "   "}\n'])
def test_tokenizer_train_on_an_empty_or_blank_file_is_an_error(tmp_path, content):
    corpus = tmp_path / ("corpus.jsonl" if content.startswith("{") else "corpus.txt")
    corpus.write_text(content, encoding="utf-8")
    result = lmforge_cli("tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "tok"))
    one_line_error(result, "no text to train a tokenizer on")
    assert not (tmp_path / "tok").exists()


def test_tokenizer_train_says_when_it_got_far_fewer_tokens_than_asked(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["今天天气很好。"] * 200), encoding="utf-8")
    result = lmforge_cli("tokenizer", "train", "--data", str(corpus), "--vocab-size", "500", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "far fewer than the 500 asked" in warning[0], result.stderr
    assert "UserWarning" not in result.stderr


@pytest.mark.parametrize(("encoding", "name"), [("gbk", "GB18030"), ("utf-16", "UTF-16")])
def test_tokenizer_train_reads_a_gbk_or_utf16_file_as_chinese(tmp_path, encoding, name):
    from lmforge.data.tokenizer import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\n".join(f"{line}（第{index}段）" for index in range(200) for line in CORPUS).encode(encoding))
    result = lmforge_cli("tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"reading it as {name}" in result.stderr and result.stderr.startswith("note:"), result.stderr
    assert "\ufffd" not in (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer = Tokenizer.load(tmp_path)
    # Merges were learnt on the real characters: a sentence of the corpus takes far fewer tokens than its bytes.
    assert len(tokenizer.encode(CORPUS[0])) < len(CORPUS[0].encode("utf-8")) / 3


def test_tokenizer_train_stops_on_a_file_in_an_unknown_encoding(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\n".join(CORPUS[:3] * 50).encode("utf-16-le"))  # no byte-order mark
    result = lmforge_cli("tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "tok"))
    one_line_error(result, "corpus.txt is not UTF-8", "UTF-16LE", "iconv -f UTF-16LE -t UTF-8")


def test_eval_perplexity_on_a_folder_of_split_files(trained_run, tmp_path):
    run, _ = trained_run
    texts = [f"{line}（第{index}段）" for index in range(40) for line in CORPUS]
    results = {}
    for form in ("txt", "jsonl"):  # the same text as .txt lines and as task-style .jsonl records
        folder = tmp_path / form
        folder.mkdir()
        for split, part in (("train", texts[:100]), ("valid", texts[100:130]), ("test", texts[130:])):
            lines = part if form == "txt" else [json.dumps({"text": text}, ensure_ascii=False) for text in part]
            (folder / f"{split}.{form}").write_text("\n".join(lines), encoding="utf-8")
        result = lmforge_cli("eval", "--model", str(run), "--data", str(folder), "--split", "test", "--json")
        assert result.returncode == 0, result.stderr
        results[form] = json.loads(result.stdout)
    # Every record of test.* is evaluated (not a hash share of it), whatever the file format.
    assert results["txt"]["perplexity"] == results["jsonl"]["perplexity"]
    assert results["txt"]["characters"] >= len("".join(texts[130:])) * 0.9
    one_line_error(
        lmforge_cli("eval", "--model", str(run), "--data", str(tmp_path), "--split", "test"),
        "is a folder but has no test file",
    )
