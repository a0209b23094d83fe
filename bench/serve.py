"""Serving throughput: N concurrent streaming clients vs the same N requests one after another.

    python bench/serve.py [--rounds 7] [--new-tokens 64] [--model RUN_DIR]

A live `lmforge serve` app (uvicorn, in this process) with continuous batching;
clients stream `/v1/chat/completions` over HTTP. For 1, 4, 8 and 16 clients each
round times the N requests sent at once and the same N sent in turn, and the
table gives aggregate completion tokens/s for both and the median ratio (goal:
>= 4x at 8 clients). Without --model: the bench-small shape (19M parameters,
random weights) with a tokenizer trained on a slice of the built-in news.
"""

import argparse
import asyncio
import importlib.resources
import json
import time
from pathlib import Path

import httpx
import torch
from _common import interleaved, median_ratio, print_table

import lmforge
from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.lm import LM
from lmforge.models.decoder import Decoder
from lmforge.serve.app import background_server, create_app
from lmforge.train.pretrain import load_recipe

PROMPT = [{"role": "user", "content": "请用几句话介绍一下北京的历史和文化。"}]


def bench_model() -> LM:
    texts = [record_text(record) for _, record in zip(range(3000), read_split("builtin:peoples-daily", "train"))]
    tokenizer = Tokenizer.train(texts, vocab_size=8192, show_progress=False)
    config = load_recipe(importlib.resources.files("lmforge.recipes") / "bench-small.yaml").model
    config.vocab_size = tokenizer.vocab_size
    config.max_position_embeddings = 512
    torch.manual_seed(0)
    return LM(Decoder(config), tokenizer)


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

    lm = lmforge.load(arguments.model, device="cpu") if arguments.model else bench_model()
    print(f"model: {lm.model.num_parameters():,} parameters; {arguments.new_tokens} new tokens per request")
    app = create_app(lm, model_name="bench", max_batch=16, max_queue=64)
    engine = app.state.engine
    loop = asyncio.new_event_loop()

    with background_server(app) as url:
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
            engine.largest_batch = 0
            results = interleaved(
                {"concurrent": concurrent(clients), "sequential": sequential(clients)}, rounds=arguments.rounds
            )
            medians = {name: sorted(rates)[len(rates) // 2] for name, rates in results.items()}
            rows.append([
                clients, f"{medians['concurrent']:,.0f}", f"{medians['sequential']:,.0f}",
                f"{median_ratio(results, 'concurrent', 'sequential'):.2f}x", engine.largest_batch,
            ])  # fmt: skip
        loop.run_until_complete(http.aclose())
    print_table(["clients", "concurrent tok/s", "sequential tok/s", "ratio (median)", "largest batch"], rows)


if __name__ == "__main__":
    main()
