"""Serving throughput: N concurrent streaming clients vs the same N requests one after another.

    python bench/serve.py [--rounds 7] [--new-tokens 64] [--model RUN_DIR]

A real `lmforge serve` process (uvicorn, continuous batching) on 127.0.0.1; the
clients, in this process, stream `/v1/chat/completions` over HTTP. For 1, 4, 8 and 16 clients each
round times the N requests sent at once and the same N sent in turn, and the
table gives aggregate completion tokens/s for both and the median ratio (goal:
>= 4x at 8 clients). Without --model: the bench-small shape (19M parameters,
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
def server_process(model: Path, port: int = 8765) -> Iterator[str]:
    command = [sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
               "--max-batch", "16", "--model-name", "bench"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, help="a decoder run folder (default: random bench-small weights)")
    arguments = parser.parse_args()

    scratch = tempfile.TemporaryDirectory()
    model = arguments.model or bench_model(Path(scratch.name))
    print(f"model: {model}; {arguments.new_tokens} new tokens per request")
    loop = asyncio.new_event_loop()

    with server_process(model) as url:
        http = httpx.AsyncClient(base_url=url, timeout=600)

        def concurrent(clients: int):
            async def run() -> float:
                start = time.perf_counter()
                counts = await asyncio.gather(
                    *(one_request(http, "bench", arguments.new_tokens, seed) for seed in range(clients))
                )
                return sum(counts) / (time.perf_counter() - start)

            return lambda: loop.run_until_complete(run())

        def sequential(clients: int):
            async def run() -> float:
                start = time.perf_counter()
                tokens = 0
                for seed in range(clients):
                    tokens += await one_request(http, "bench", arguments.new_tokens, seed)
                return tokens / (time.perf_counter() - start)

            return lambda: loop.run_until_complete(run())

        concurrent(2)()  # warm-up: allocator, thread pools, first-request paths
        rows = []
        for clients in (1, 4, 8, 16):
            print(f"{clients} clients:")
            results = interleaved(
                {"concurrent": concurrent(clients), "sequential": sequential(clients)}, rounds=arguments.rounds
            )
            medians = {name: sorted(rates)[len(rates) // 2] for name, rates in results.items()}
            rows.append([
                clients, f"{medians['concurrent']:,.0f}", f"{medians['sequential']:,.0f}",
                f"{median_ratio(results, 'concurrent', 'sequential'):.2f}x",
            ])  # fmt: skip
        loop.run_until_complete(http.aclose())
    print_table(["clients", "concurrent tok/s", "sequential tok/s", "ratio (median)"], rows)
    scratch.cleanup()


if __name__ == "__main__":
    main()
