"""Greedy decoding tokens/s: lmforge's engine vs Hugging Face `generate` on the same weights.

    python bench/decode.py [--rounds 7] [--new-tokens 256]

A 32-token prompt, 256 new tokens, batch 1 and batch 8, fp32, the bench-small
model shape; lmforge eager and with compiled decoding steps (`generate --compile`,
compiled once before the rounds). All must produce the same tokens at batch 1
(checked and printed).
"""

import argparse
import importlib.resources
import time

import torch
from _common import interleaved, median_ratio, print_table
from train_throughput import hf_model

from lmforge.export.hf import to_llama_state
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.tasks.causal_lm import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=256)
    arguments = parser.parse_args()

    recipe = load_recipe(importlib.resources.files("lmforge.recipes") / "bench-small.yaml")
    config = recipe.model
    config.max_position_embeddings = 32 + arguments.new_tokens
    torch.manual_seed(0)
    ours = Decoder(config).eval()
    reference = hf_model(config).eval()
    reference.load_state_dict(to_llama_state(ours.state_dict()))
    reference.generation_config.pad_token_id = 0
    greedy = SamplingConfig(max_new_tokens=arguments.new_tokens, temperature=0, repetition_penalty=1.0)

    def ours_rate(prompts, compiled: bool):
        def run() -> float:
            start = time.perf_counter()
            outputs = generate_ids(ours, prompts.tolist(), greedy, compiled=compiled)
            return sum(len(output.token_ids) for output in outputs) / (time.perf_counter() - start)

        return run

    def hf_generate(prompts):
        with torch.inference_mode():
            return reference.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                max_new_tokens=arguments.new_tokens,
                min_new_tokens=arguments.new_tokens,
            )[:, prompts.shape[1] :]

    def hf_rate(prompts):
        def run() -> float:
            start = time.perf_counter()
            return hf_generate(prompts).numel() / (time.perf_counter() - start)

        return run

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, config.vocab_size, (1, 32), generator=generator)
    hf_tokens = hf_generate(prompt)[0].tolist()
    for compiled in (False, True):
        start = time.perf_counter()
        ours_tokens = generate_ids(ours, prompt.tolist(), greedy, compiled=compiled)[0].token_ids
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
        name = f"compiled ({time.perf_counter() - start:.0f} s with the compile)" if compiled else "eager"
        print(f"batch 1, lmforge {name}: {same}/{len(hf_tokens)} greedy tokens identical to Hugging Face's")

    rows = []
    for batch_size in (1, 8):
        prompts = torch.randint(1, config.vocab_size, (batch_size, 32), generator=generator)
        print(f"batch {batch_size}:")
        ours_rate(prompts, compiled=True)()  # compile this batch size before timing
        contenders = {
            "lmforge": ours_rate(prompts, compiled=False),
            "lmforge compiled": ours_rate(prompts, compiled=True),
            "hf": hf_rate(prompts),
        }
        results = interleaved(contenders, rounds=arguments.rounds)
        for name in contenders:
            rates = sorted(results[name])
            rows.append(
                [batch_size, name, f"{rates[len(rates) // 2]:,.0f}", f"{median_ratio(results, name, 'hf'):.2f}x"]
            )
    print_table(["batch", "decoder", "tokens/s (median)", "vs hf (median ratio)"], rows)


if __name__ == "__main__":
    main()
