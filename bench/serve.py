"""Serving throughput: N concurrent streaming clients vs the same N requests one after another, eager and compiled.

    python bench/serve.py [--rounds 7] [--new-tokens 64] [--model RUN_DIR] [--clients 1 4 8 16]

Two real `lmforge serve` processes (uvicorn, continuous batching) on 127.0.0.1, one eager and one
with `--compile` (compiled steps while at most 4 sequences are live); the clients, in this process,
stream `/v1/chat/completions` over HTTP. For each number of clients, each round times the N requests
sent at once and the same N sent in turn, on both servers, and the table gives aggregate completion
tokens/s and the median ratios (goals: >= 4x at 8 clients on each server; one client >= 2x on the
compiled server than on the eager one). Without --model: the bench-small shape (19M parameters,
random weights) with a tokenizer trained on a slice of the built-in news.
"""

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from _common import interleaved, median_ratio, print_table

from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import save_model
from lmforge.models.decoder import Decoder
from lmforge.tasks.causal_lm import load_recipe

PROMPT = [{"role": "user", "content": "请用几句话介绍一下北京的历史和文化。"}]


def bench_model(folder: Path) -> Path:
    """A run folder with the bench-small shape, random weights and a tokenizer trained on some built-in news."""
    texts = [record_text(record) for _, record in zip(range(3000), read_split("builtin:peoples-daily", "train"))]
    tokenizer = Tokenizer.train(texts, vocab_size=8192, show_progress=False)
    config = load_recipe(importlib.resources.files("lmforge.recipes") / "bench-small.yaml").model
    config.vocab_size = tokenizer.vocab_size
    config.max_position_embeddings = 512
    torch.manual_seed(0)
    save_model(folder, Decoder(config))
    tokenizer.save(folder)
    return folder


@contextlib.contextmanager
def server_process(
    model: Path, port: int, compiled: bool = False, log=subprocess.DEVNULL, start_seconds: float = 120
) -> Iterator[str]:
    """`lmforge serve` in a child process, until the block ends; yields its URL. `log`: where its output goes."""
    command = [sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
               "--max-batch", "16", "--model-name", "bench", *(["--compile"] if compiled else [])]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmforge serve did not start: {' '.join(command)}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def one_request(http: httpx.AsyncClient, model: str, new_tokens: int, seed: int) -> int:
    """Stream one chat completion; return its completion tokens (from the usage chunk)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": new_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: ") :]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


def rates(loop: asyncio.AbstractEventLoop, http: httpx.AsyncClient, clients: int, new_tokens: int):
    """Two timed runs of `clients` requests: all at once, and one after another; each -> tokens/s."""

    async def concurrent() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one_request(http, "bench", new_tokens, seed) for seed in range(clients)))
        return sum(counts) / (time.perf_counter() - start)

    async def sequential() -> float:
        start = time.perf_counter()
        tokens = 0
        for seed in range(clients):
            tokens += await one_request(http, "bench", new_tokens, seed)
        return tokens / (time.perf_counter() - start)

    return lambda: loop.run_until_complete(concurrent()), lambda: loop.run_until_complete(sequential())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, help="a decoder run folder (default: random bench-small weights)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    arguments = parser.parse_args()

    scratch = tempfile.TemporaryDirectory()
    model = arguments.model or bench_model(Path(scratch.name))
    print(f"model: {model}; {arguments.new_tokens} new tokens per request")
    loop = asyncio.new_event_loop()
    with server_process(model, 8765) as eager_url, server_process(model, 8766, compiled=True) as compiled_url:
        servers = {"eager": httpx.AsyncClient(base_url=eager_url, timeout=600),
                   "compiled": httpx.AsyncClient(base_url=compiled_url, timeout=600)}  # fmt: skip
        for http in servers.values():
            # Warm-up: allocator, thread pools, first-request paths, and (compiled) one graph per batch size 1-4.
            for clients in (1, 2, 3, 4):
                rates(loop, http, clients, arguments.new_tokens)[0]()
        rows = []
        for clients in arguments.clients:
            print(f"{clients} clients:")
            contenders = {}
            for name, http in servers.items():
                contenders[f"{name} concurrent"], contenders[f"{name} sequential"] = rates(
                    loop, http, clients, arguments.new_tokens
                )
            results = interleaved(contenders, rounds=arguments.rounds)
            medians = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
            for name in servers:
                rows.append([
                    clients, name, f"{medians[f'{name} concurrent']:,.0f}", f"{medians[f'{name} sequential']:,.0f}",
                    f"{median_ratio(results, f'{name} concurrent', f'{name} sequential'):.2f}x",
                    f"{median_ratio(results, f'{name} concurrent', 'eager concurrent'):.2f}x",
                ])  # fmt: skip
        for http in servers.values():
            loop.run_until_complete(http.aclose())
    header = ["clients", "server", "concurrent tok/s", "sequential tok/s", "vs sequential", "vs eager concurrent"]
    print_table(header, rows)
    scratch.cleanup()


if __name__ == "__main__":
    main()
