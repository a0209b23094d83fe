"""The `lmforge` command: one thin subcommand per stage (parse -> call one library function -> print).

User errors (`UserError`) print one line and exit with code 2. Tracebacks never
show local variables: they can hold secrets such as API keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from lmforge.config import describe, parse_overrides
from lmforge.errors import Note, UserError
from lmforge.tasks import TASKS

app = typer.Typer(
    help="lmforge: build a language model end to end — data, tokenizer, model, training, generation, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(help="Prepare corpora for training.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataOption = Annotated[str, typer.Option("--data", help="builtin:peoples-daily, builtin:reviews, or a file path")]
DataSources = Annotated[
    list[str], typer.Option("--data", help="builtin:peoples-daily, builtin:reviews, or a file path; repeat for several")
]
ModelOption = Annotated[Path, typer.Option("--model", help="a run folder (config.json, model.safetensors, ...)")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")]
CompileOption = Annotated[
    bool, typer.Option("--compile", help="decode with torch.compile'd steps: faster after a one-off compile (decoders)")
]
FsdpOption = Annotated[bool, typer.Option("--fsdp", help="under torchrun: shard the model (FSDP) instead of DDP")]
KeepLastOption = Annotated[int | None, typer.Option("--keep-last", help="checkpoints to keep (train.keep_last)")]
BASELINE_CHOICES = ("all", "none")
BaselinesOption = Annotated[
    str | None,
    typer.Option(help="all, or none to skip the report's baselines (sentiment: snownlp's Bayes, minutes uncached)"),
]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run folder to write")] = Path("runs/demo"),
    minutes: Annotated[float, typer.Option(help="wall-time budget for pretraining")] = 5.0,
    chat_minutes: Annotated[float, typer.Option(help="wall-time budget for chat fine-tuning (0 = skip it)")] = 1.1,
    max_steps: Annotated[
        int | None, typer.Option(help="pretraining steps at most (with --minutes, whichever ends first)")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """The main job on the built-in corpus: tokenizer, pretraining, chat fine-tuning, evaluation, samples, report.

    Example: lmforge demo --out runs/demo
    """
    from lmforge.demo import run_demo

    run_demo(out, minutes=minutes, device=device, chat_minutes=chat_minutes, max_steps=max_steps)


@tokenizer_app.command("train")
def tokenizer_train(
    data: DataSources,
    out: Annotated[Path, typer.Option(help="folder for tokenizer.json and tokenizer_config.json")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size, special tokens included")] = 8192,
    han_characters: Annotated[
        bool, typer.Option(help="no merge crosses a Chinese character (one token per character: QA spans align)")
    ] = False,
) -> None:
    """Train a byte-level BPE tokenizer on the train split and report characters/bytes per token.

    Example: lmforge tokenizer train --data builtin:peoples-daily --vocab-size 8192 --out runs/tok
    """
    from lmforge.data.sources import read_split, record_text
    from lmforge.data.tokenizer import Tokenizer, tokenizer_stats

    def texts(split: str):
        return (record_text(record) for source in data for record in read_split(source, split))

    tokenizer = Tokenizer.train(texts("train"), vocab_size, han_characters=han_characters)
    tokenizer.save(out)
    stats = tokenizer_stats(tokenizer, texts("valid"))
    typer.echo(f"saved a {tokenizer.vocab_size}-token tokenizer to {out}")
    for language, numbers in stats.items():
        typer.echo(
            f"  {language}: {numbers['chars_per_token']:.2f} characters/token, "
            f"{numbers['bytes_per_token']:.2f} bytes/token on validation text ({numbers['characters']:,} characters)"
        )


@data_app.command("prepare")
def data_prepare(
    data: DataSources,
    tokenizer: Annotated[Path, typer.Option(help="folder with tokenizer.json: a run folder or `tokenizer train`'s")],
    out: Annotated[Path, typer.Option(help="folder for the shards, index.json and a copy of the tokenizer")],
    workers: Annotated[int, typer.Option(help="tokenizer processes (the output is the same for any number)")] = 1,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard file")] = 100_000_000,
    split: Annotated[list[str] | None, typer.Option(help="split to write, repeatable (default: train, valid)")] = None,
    valid_fraction: Annotated[float, typer.Option(help="share of documents in the valid split")] = 0.01,
    test_fraction: Annotated[float, typer.Option(help="share of documents in the test split")] = 0.01,
    overwrite: Annotated[bool, typer.Option(help="replace shards --out already holds from another source")] = False,
) -> None:
    """Tokenize a corpus of any size into memory-mapped shards that training reads lazily: pretrain with --data OUT.

    Example: lmforge data prepare --data corpus.jsonl --data builtin:peoples-daily --tokenizer runs/tok --out data/c
    """
    import time

    from lmforge.data.shards import prepare_shards
    from lmforge.data.tokenizer import Tokenizer

    if not tokenizer.is_dir():
        raise UserError(f"no tokenizer folder {tokenizer}: pass a run folder or one made by lmforge tokenizer train")
    started = time.perf_counter()
    index = prepare_shards(
        data, Tokenizer.load(tokenizer), out, splits=split or ("train", "valid"), shard_tokens=shard_tokens,
        workers=workers, valid_fraction=valid_fraction, test_fraction=test_fraction, overwrite=overwrite,
    )  # fmt: skip
    splits = index["splits"].values()
    tokens = sum(entry["tokens"] for entry in splits)
    megabytes = tokens * {"uint16": 2, "uint32": 4}[index["dtype"]] / 1e6
    typer.echo(
        f"{sum(len(entry['shards']) for entry in splits)} shards, {tokens:,} tokens, "
        f"{sum(entry['documents'] for entry in splits):,} documents, {megabytes:.1f} MB "
        f"in {time.perf_counter() - started:.1f} s; saved to {out}"
    )


def _recipe_help() -> str:
    from lmforge.tasks.causal_lm import PretrainRecipe

    rows = "\n\n".join(f"--{key} (default {default!r}): {help}" for key, help, default in describe(PretrainRecipe))
    return f"Any recipe key can be overridden as --section.key value:\n\n{rows}"


@app.command()
def serve(
    model: ModelOption,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the server to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LMFORGE_API_KEY",
            help="require 'Authorization: Bearer KEY' on all but /health and /; better set the LMFORGE_API_KEY "
            "environment variable: a key on the command line shows in `ps` to every user of the machine",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="sequences decoded together in one step")] = 8,
    max_queue: Annotated[int, typer.Option(help="sequences that may wait for a slot; beyond it: 429")] = 64,
    cors_origin: Annotated[list[str] | None, typer.Option(help="let pages from this origin call the API")] = None,
    model_name: Annotated[str | None, typer.Option(help="the id clients use (default: the folder's name)")] = None,
    device: DeviceOption = "auto",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="compiled decoding steps while at most 4 sequences are live: faster after a one-off "
            "compile per batch size (1-4)",
        ),
    ] = False,
    max_body_mb: Annotated[float, typer.Option(help="largest request body in MiB; a larger one is a 413")] = 4.0,
    max_connections: Annotated[
        int,
        typer.Option(help="open TCP connections; at the cap, the one waiting longest for its request head is closed"),
    ] = 1000,
    header_timeout: Annotated[float, typer.Option(help="seconds a connection has to send its request head")] = 10.0,
    keep_alive_timeout: Annotated[float, typer.Option(help="seconds an idle kept-alive connection stays open")] = 5.0,
) -> None:
    """Serve a decoder model over an OpenAI-compatible API, with a web chat page at /.

    Example: lmforge serve --model runs/demo/chat, then open http://127.0.0.1:8000/ or point any
    OpenAI client at base_url http://127.0.0.1:8000/v1.
    """
    from lmforge.serve.app import serve as run_server
    from lmforge.serve.connections import ConnectionLimits

    if max_batch < 1 or max_queue < 0:
        raise UserError(f"--max-batch must be >= 1 and --max-queue >= 0, not {max_batch} and {max_queue}")
    if min(max_body_mb, max_connections, header_timeout, keep_alive_timeout) <= 0:
        raise UserError("--max-body-mb, --max-connections, --header-timeout and --keep-alive-timeout must be positive")
    run_server(
        model, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
        cors_origins=cors_origin or (), device=device, model_name=model_name, compiled=compile,
        max_body_bytes=int(max_body_mb * 2**20),
        limits=ConnectionLimits(max_connections, header_timeout, keep_alive_timeout),
    )  # fmt: skip


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_recipe_help(),
)
def pretrain(
    context: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="YAML recipe, e.g. recipes/demo.yaml")] = None,
    data: Annotated[str | None, typer.Option(help="data source (overrides data.source)")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/pretrain"),
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides train.max_steps)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = False,
    fsdp: FsdpOption = False,
    keep_last: KeepLastOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Pretrain a decoder-only model (causal LM) from a recipe; under torchrun on N processes (DDP, or FSDP).

    Example: lmforge pretrain --config recipes/demo.yaml --out runs/news --max-steps 2000
             torchrun --nproc_per_node 2 -m lmforge pretrain --config recipes/demo.yaml --out runs/news
    """
    from lmforge.tasks.base import run_task
    from lmforge.tasks.causal_lm import TASK, load_recipe
    from lmforge.train.distributed import launched, world

    overrides = parse_overrides(context.args)
    overrides.setdefault("device", device)
    if data:
        overrides.setdefault("data", {})["source"] = data
    if max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = max_steps
    if fsdp:
        overrides.setdefault("train", {})["fsdp"] = True
    if keep_last is not None:
        overrides.setdefault("train", {})["keep_last"] = keep_last
    with launched(out, device) as (folder, process_device):
        overrides["device"] = process_device
        recipe = load_recipe(config, overrides)
        metrics = run_task(TASK, recipe, folder, resume=resume, progress=world().main)
        if world().main:
            before, after = metrics["before"], metrics["after"]
            typer.echo(
                f"validation perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}, "
                f"bits/char {before['bits_per_char']:.3f} -> {after['bits_per_char']:.3f}; saved to {out}"
            )


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="one or more prompts (several are decoded as one batch)")],
    model: ModelOption,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest tokens (0 = all)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass (1 = all)")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="1 = off")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    form: Annotated[
        str | None, typer.Option(help="a poem form to write exactly: 五言绝句, 七言律诗, 5-quatrain, ...")
    ] = None,
    rhyme: Annotated[bool, typer.Option(help="with --form: even lines rhyme (pinyin finals)")] = False,
    stream: Annotated[bool, typer.Option(help="print text as it is generated")] = False,
    compile: CompileOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Continue prompts with a trained model. Defaults come from the model's generation_config.json.

    Example: lmforge generate --model runs/demo "今天的天气" --max-new-tokens 50 --stream
             lmforge generate --model runs/poems $'题目：春夜\\n体裁：五言绝句\\n正文：\\n' --form 五言绝句 --rhyme
    """
    import lmforge

    if rhyme and not form:
        raise UserError("--rhyme applies to a poem form: add --form")
    lm = lmforge.load(model, device=device, compiled=compile)
    sampling = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        constraint=lm.form_constraint(form, rhyme) if form else None,
    )
    if stream:
        for text in prompt:
            typer.echo(text, nl=False)
            for piece in lm.generate(text, stream=True, stop=stop, **sampling):
                typer.echo(piece, nl=False)
            typer.echo()
        return
    for text, completion in zip(prompt, lm.generate(prompt, stop=stop, **sampling)):
        typer.echo(text + completion)


@app.command()
def chat(
    model: ModelOption,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="longest answer, in tokens")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest tokens (0 = all)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass (1 = all)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    tools: Annotated[
        str | None, typer.Option(help="built-in tools the model may call: calculator,date,units,review")
    ] = None,
    compile: CompileOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Chat with a chat model in the terminal: streamed answers, /reset, /system TEXT, /save FILE, /exit.

    With --tools the model's tool calls run here (arithmetic parsed, never eval'd) and it answers from the results.

    Example: lmforge chat --model runs/demo/chat --system "你是一个乐于助人的中文助手。"
             lmforge chat --model runs/tools --tools calculator,date
    """
    import lmforge
    from lmforge.chat_terminal import run_chat
    from lmforge.data.sources import builtin_toolbox

    toolbox = builtin_toolbox([name.strip() for name in tools.split(",") if name.strip()]) if tools else None
    lm = lmforge.load(model, device=device, compiled=compile)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    run_chat(lm, system, toolbox=toolbox, **{key: value for key, value in sampling.items() if value is not None})


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Tasks: " + "; ".join(f"{name}: {what}" for name, what in TASKS.items()),
)
def finetune(
    context: typer.Context,
    task: Annotated[str, typer.Option(help="what to train: " + ", ".join(TASKS))],
    out: Annotated[Path, typer.Option(help="run folder")],
    data: Annotated[str | None, typer.Option(help="folder of train/valid/test.jsonl, builtin:NAME or a file")] = None,
    base: Annotated[str | None, typer.Option(help="model to start from: run folder, HF folder, builtin:minilm")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML recipe, e.g. recipes/sentiment.yaml")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides train.max_steps)")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="train LoRA adapters of this rank (chat, dpo)")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA scale: updates times alpha/rank")] = None,
    lora_targets: Annotated[str | None, typer.Option(help="LoRA targets: q,k,v,o,gate,up,down")] = None,
    teacher: Annotated[str | None, typer.Option(help="teacher run folder (distill)")] = None,
    baselines: BaselinesOption = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = False,
    fsdp: FsdpOption = False,
    keep_last: KeepLastOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Train a model for a task, then evaluate it on the test split and write report.md and metrics.json.

    Any recipe key can be overridden as --section.key value (e.g. --train.lr 3e-4).

    Examples: lmforge finetune --task sentiment --data builtin:reviews --base builtin:minilm --out runs/sentiment
              lmforge finetune --task chat --base runs/demo --data builtin:instructions --lora-rank 8 --out runs/chat
    """
    from lmforge.config import from_dict, load_yaml, merge
    from lmforge.run_folder import RunFolder
    from lmforge.tasks import task_module
    from lmforge.tasks.base import run_task
    from lmforge.train.distributed import launched, world

    module = task_module(task)
    if not hasattr(module, "TASK"):
        raise UserError(f"task '{task}' is evaluation-only: use lmforge eval --task {task}")
    overrides = parse_overrides(context.args)
    overrides.setdefault("device", device)
    if data:
        overrides.setdefault("data", {})["source"] = data
    if base:
        overrides["base"] = base
    if max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = max_steps
    lora = {"rank": lora_rank, "alpha": lora_alpha, "targets": lora_targets}
    overrides.setdefault("lora", {}).update({key: value for key, value in lora.items() if value is not None})
    if not overrides["lora"]:
        del overrides["lora"]
    if teacher:
        overrides["teacher"] = teacher
    if baselines is not None:
        _check_baselines(task, baselines, "baselines" in {f.name for f in dataclasses.fields(module.TASK.Recipe)})
        overrides["baselines"] = baselines
    if fsdp:
        overrides.setdefault("train", {})["fsdp"] = True
    if keep_last is not None:
        overrides.setdefault("train", {})["keep_last"] = keep_last
    with launched(out, device) as (folder, process_device):
        overrides["device"] = process_device
        recipe = from_dict(module.TASK.Recipe, merge(load_yaml(config) if config else {}, overrides))
        metrics = run_task(module.TASK, recipe, folder, resume=resume)
        if world().main:
            _print_task_metrics(metrics)
            typer.echo(f"saved to {out} ({RunFolder.REPORT}, {RunFolder.METRICS})")


@app.command("eval")
def evaluate(
    model: ModelOption,
    task: Annotated[str | None, typer.Option(help="score a task (see finetune --help); default: perplexity")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="data source: builtin:NAME, a file (split by hash), a folder of train/valid/test files or a "
            "`data prepare` folder; default: the built-in news for perplexity"
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="train, valid or test")] = "valid",
    out: Annotated[
        Path | None, typer.Option(help="folder for report.md and metrics.json (default: MODEL/eval-TASK-SPLIT)")
    ] = None,
    max_windows: Annotated[int | None, typer.Option(help="evaluate at most this many context windows")] = None,
    max_examples: Annotated[int, typer.Option(help="score at most this many examples of a task (0 = all)")] = 0,
    num_beams: Annotated[int | None, typer.Option(help="beam width (translate, summarize)")] = None,
    length_penalty: Annotated[float | None, typer.Option(help="beam length penalty (translate, summarize)")] = None,
    no_repeat_ngram_size: Annotated[
        int | None, typer.Option(help="never repeat an n-gram of this many tokens (translate, summarize)")
    ] = None,
    mbr_samples: Annotated[
        int | None,
        typer.Option(help="minimum Bayes risk decoding over this many samples, 0 = off (translate, summarize)"),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(help="another run of the task as one more baseline, paired bootstrap (translate, summarize)"),
    ] = None,
    baselines: BaselinesOption = None,
    allow_code_execution: Annotated[
        bool, typer.Option(help="run the model's code to score HumanEval pass@k (code; see the README first)")
    ] = False,
    samples: Annotated[int | None, typer.Option(help="completions per HumanEval problem, for pass@k (code)")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature of those completions (code)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON line")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Perplexity, bits per byte and bits per character of a model on a data split, or a task's metrics.

    Examples: lmforge eval --model runs/demo --data builtin:peoples-daily --split test
              lmforge eval --task sentiment --model runs/sentiment --data ../shared/data/sentiment --split test
              lmforge eval --task code --model runs/code --data ../shared/data/code/humaneval.jsonl \
                --allow-code-execution
    """
    if task is not None:
        decoding = dict(
            num_beams=num_beams,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            mbr_samples=mbr_samples,
            compare=compare,
        )
        options = {key: value for key, value in decoding.items() if value is not None}
        code = dict(allow_code_execution=allow_code_execution or None, samples=samples, temperature=temperature)
        code = {key: value for key, value in code.items() if value is not None}
        if code and task != "code":
            raise UserError(f"--allow-code-execution, --samples and --temperature apply to the code task, not {task}")
        options.update(code)
        _evaluate_task(task, model, data, split, out, max_examples, options, baselines, as_json)
        return

    import lmforge
    from lmforge.evaluate.perplexity import evaluate_source

    data = data or "builtin:peoples-daily"
    lm = lmforge.load(model, device=device)
    results = {"model": str(model), "data": data, "split": split, **evaluate_source(lm, data, split, max_windows)}
    if as_json:
        typer.echo(json.dumps(results, ensure_ascii=False))
        return
    typer.echo(
        f"{data} [{split}]: perplexity {results['perplexity']:.2f}, bits/byte {results['bits_per_byte']:.4f}, "
        f"bits/char {results['bits_per_char']:.4f} over {results['tokens']:,} tokens"
    )


CODE_OPTIONS = {"allow_code_execution", "samples", "temperature"}


def _evaluate_task(
    task: str,
    model: Path,
    data: str | None,
    split: str,
    out: Path | None,
    max_examples: int,
    options: dict,
    baselines: str | None,
    as_json: bool,
) -> None:
    """`lmforge eval --task`: the task's evaluate_run on one split, into a folder of its own."""
    from lmforge.run_folder import RunFolder
    from lmforge.tasks import task_module
    from lmforge.tasks.examples import TaskData

    module = task_module(task)
    source = data or module.Recipe().data.source
    if set(options) - CODE_OPTIONS and task not in ("translate", "summarize"):
        raise UserError(
            "--num-beams, --length-penalty, --no-repeat-ngram-size, --mbr-samples and --compare apply to translate and "
            f"summarize, not {task}"
        )
    if baselines is not None:
        _check_baselines(task, baselines, "baselines" in inspect.signature(module.evaluate_run).parameters)
        options["baselines"] = baselines
    # A folder of its own, so evaluating never overwrites the run's own report (the demo's, a fine-tune's).
    out = out or model / f"eval-{task}-{split}"
    metrics = module.evaluate_run(model, TaskData(source=source, max_eval_examples=max_examples), split, out, **options)
    if as_json:
        typer.echo(json.dumps(metrics, ensure_ascii=False))
        return
    _print_task_metrics(metrics)
    typer.echo(f"report: {RunFolder(out).report}")


@app.command()
def explain(
    text: Annotated[str, typer.Argument(help="the text to explain (a prompt, a review, a source sentence)")],
    model: ModelOption,
    target: Annotated[
        str | None, typer.Option(help="classifiers: the label to explain (default: the predicted one)")
    ] = None,
    continuation: Annotated[
        str | None,
        typer.Option(help="decoders, encoder-decoders: the continuation to explain (default: the model's greedy one)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the pictures and explain.html (MODEL/explain)")] = None,
    steps: Annotated[int, typer.Option(help="integrated-gradient steps: cost is steps x tokens")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="length of the model's own continuation if none is given")] = 16,
    top_k: Annotated[int, typer.Option(help="logit lens: guesses kept per layer and position")] = 5,
    device: DeviceOption = "auto",
) -> None:
    """Why the model answered: attention maps (every layer and head), attributions of the input (integrated
    gradients with its completeness check, gradient x input, occlusion) and, for decoders, the logit lens.

    Writes attention-*-layerN.png, heads.png, attribution.png, lens.png and explain.html (offline viewer).

    Examples: lmforge explain --model runs/sentiment "这家餐厅的菜很好吃，服务也很周到"
              lmforge explain --model runs/demo "中国的首都是" --continuation "北京"
    """
    import lmforge
    from lmforge.explain.render import describe

    lm = lmforge.load(model, device=device)
    explanation = lm.explain(
        text, target=target, continuation=continuation, steps=steps, max_new_tokens=max_new_tokens, top_k=top_k
    )
    typer.echo(describe(explanation))
    folder = out or model / "explain"
    written = explanation.save(folder)
    typer.echo(f"wrote {len(written)} files to {folder}; open {folder / 'explain.html'} in a browser")


EXPORT_FORMATS = {
    "hf": "a Hugging Face folder (LlamaForCausalLM) that transformers loads with no custom code",
    "gguf": "one .gguf file for llama.cpp (--quant f16 or q8_0)",
    "onnx": "an ONNX graph (decoder with past key/values, or encoder) for onnxruntime",
}


@app.command(epilog="Formats: " + "; ".join(f"{name}: {what}" for name, what in EXPORT_FORMATS.items()))
def export(
    model: ModelOption,
    format: Annotated[str, typer.Option("--format", help="hf, gguf or onnx")],
    out: Annotated[Path, typer.Option(help="output folder (hf, onnx) or file (gguf)")],
    quant: Annotated[str, typer.Option(help="gguf weight type: f16 or q8_0")] = "f16",
) -> None:
    """Export a run folder for other tools: Hugging Face transformers, llama.cpp (GGUF) or onnxruntime.

    Examples: lmforge export --model runs/demo/chat --format hf --out exports/chat-hf
              lmforge export --model runs/demo/chat --format gguf --quant q8_0 --out exports/chat.gguf
    """
    import importlib

    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {format!r}; known: {', '.join(EXPORT_FORMATS)}")
    module = importlib.import_module(f"lmforge.export.{format}")
    written = module.export(model, out, **({"quant": quant} if format == "gguf" else {}))
    typer.echo(f"wrote {written}")


@app.command("import")
def import_model(
    source: Annotated[
        Path, typer.Option("--from", help="a Hugging Face folder: Llama or Qwen2 (decoders) or BERT (encoders)")
    ],
    out: Annotated[Path, typer.Option(help="run folder to write (new or empty)")],
) -> None:
    """Bring a Hugging Face model folder into lmforge, to fine-tune, chat with, serve and evaluate (safetensors only).

    Example: lmforge import --from models/Qwen2.5-0.5B-Instruct --out runs/qwen, then lmforge chat --model runs/qwen
    """
    from lmforge.export.hf import import_folder

    family = import_folder(source, out)
    typer.echo(f"imported {source} as an lmforge {family}; saved to {out}")


def _check_baselines(task: str, baselines: str, supported: bool) -> None:
    if baselines not in BASELINE_CHOICES:
        raise UserError(f"--baselines takes {' or '.join(BASELINE_CHOICES)}, not '{baselines}'")
    if not supported:
        raise UserError(f"--baselines applies to tasks with costly baselines (sentiment), not {task}")


def _print_task_metrics(metrics: dict) -> None:
    numbers = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "training_minutes"}
    typer.echo(_decoding_label(metrics.get("decoding")) + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    if metrics.get("baselines_skipped"):
        typer.echo("  baselines skipped (--baselines none)")
    for name, values in metrics.get("baselines", {}).items():
        scores = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        typer.echo(f"  baseline {name}: {scores}")
        for key, d in values.get("difference", {}).items():
            typer.echo(
                f"    model minus {name}, {key}: {d['mean']:+.2f} (95% interval {d['low']:+.2f} to {d['high']:+.2f})"
            )


def _decoding_label(decoding: dict | None) -> str:
    """Which decoding a text-to-text task's headline numbers come from: "MBR over 32 samples: ", or ""."""
    if not decoding:
        return ""
    if decoding.get("mbr_samples"):
        return f"MBR over {decoding['mbr_samples']} samples: "
    return f"beam search ({decoding['num_beams']}): " if decoding["num_beams"] > 1 else "greedy: "


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="where to look for run folders")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON line: a list of runs")] = False,
) -> None:
    """List the run folders under FOLDER, newest first: kind, step, best validation loss, last loss, status.

    Example: lmforge runs runs/
    """
    from lmforge.runs import as_json as runs_as_json
    from lmforge.runs import format_table, list_runs

    summaries = list_runs(folder)
    if as_json:
        typer.echo(runs_as_json(summaries))
    elif summaries:
        typer.echo(format_table(summaries))
    else:
        typer.echo(f"no run folders under {folder}")


@app.command()
def quantize(
    model: ModelOption,
    method: Annotated[str, typer.Option(help="int8, int8-dynamic, int4 or bf16")],
    out: Annotated[Path, typer.Option(help="new run folder")],
    group_size: Annotated[
        int, typer.Option(help="int4: inputs per scale and offset (32, 64, 128, 256 use the fast CPU kernel)")
    ] = 32,
    exclude: Annotated[
        list[str] | None, typer.Option(help="keep this layer in float: a name like lm_head or down_proj (repeatable)")
    ] = None,
) -> None:
    """Quantize a run folder's linear layers into a new run folder that every command loads.

    int8: one scale per output channel, 4x smaller layers; int8-dynamic: the same file, and activations
    quantized on the fly on CPU (faster for batches); int4: a scale and an offset per group of inputs, two
    values per byte; bf16: every weight cast (computes in bf16, slower than fp32 on most CPUs).
    Tokenizer and generation config are copied; config.json records the method and the layers.

    Examples: lmforge quantize --model runs/demo --method int8 --out runs/demo-int8
              lmforge quantize --model runs/demo --method int4 --group-size 64 --out runs/demo-int4
              lmforge generate --model runs/demo-int8 "中国人民"
    """
    from lmforge.compress.quantize import quantize_run

    summary = quantize_run(model, out, method, group_size, exclude or ())
    before, after = summary["bytes_before"], summary["bytes_after"]
    layers = f"{summary['modules']} linear layers, " if method != "bf16" else ""
    typer.echo(
        f"{method}: {layers}model.safetensors {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"({before / after:.1f}x smaller); saved to {out}"
    )


@app.command()
def prune(
    model: ModelOption,
    sparsity: Annotated[float, typer.Option(help="fraction of the weights to set to zero, e.g. 0.5")],
    out: Annotated[Path, typer.Option(help="new run folder")],
    scope: Annotated[
        str, typer.Option(help="layer: the same sparsity in every layer; global: the smallest weights of all layers")
    ] = "layer",
    recover_steps: Annotated[
        int, typer.Option(help="then fine-tune this many steps with the pruned weights held at zero (0 = none)")
    ] = 0,
    data: Annotated[str, typer.Option(help="recovery text: builtin:peoples-daily or a file")] = "builtin:peoples-daily",
    recover_lr: Annotated[float, typer.Option(help="recovery learning rate")] = 1e-4,
    device: DeviceOption = "auto",
) -> None:
    """Magnitude-prune a run folder's linear layers (the output layer stays dense) into a new run folder.

    The result is an ordinary run folder (dense tensors holding zeros) with prune.json describing it.

    Examples: lmforge prune --model runs/demo --sparsity 0.5 --out runs/demo-p50
              lmforge prune --model runs/demo --sparsity 0.7 --scope global --recover-steps 100 --out runs/demo-p70
    """
    from lmforge.compress.prune import prune_run

    summary = prune_run(model, out, sparsity, scope, recover_steps, data, recover_lr, device=device)
    low, high = summary["per_layer"]
    typer.echo(
        f"{summary['layers']} linear layers pruned to {summary['sparsity']:.1%} zeros "
        f"({low:.1%} to {high:.1%} per layer)"
    )
    if recover_steps:
        typer.echo(
            f"recovery: validation loss {summary['valid_loss_before']:.4f} -> {summary['valid_loss_after']:.4f} "
            f"in {recover_steps} steps ({summary['minutes']:.1f} min)"
        )
    typer.echo(f"saved to {out}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line a user reads ("warning: ..." or "note: ..."), not Python's file:line: UserWarning format.
    prefix = "note" if issubclass(category, Note) else "warning"
    typer.echo(f"{prefix}: {message}", err=True)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
