"""Training tokens/s: lmforge's decoder vs Hugging Face's LlamaForCausalLM at the bench-small config.

    python bench/train_throughput.py [--rounds 7] [--steps 3] [--compile]

One step = forward + cross-entropy + backward + gradient clipping + AdamW, fp32,
same random data for both. Prints tokens/s per round, the median ratio, and
lmforge's model-FLOPs utilisation against the measured fp32 matmul peak.
"""

import argparse
import importlib.resources
import time

import torch
import transformers
from _common import interleaved, measure_peak, median_ratio, print_table

from lmforge.export.hf import llama_config, to_llama_state
from lmforge.models.decoder import Decoder
from lmforge.tasks.causal_lm import load_recipe
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer


def hf_model(config):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config), attn_implementation="sdpa"))


def flops_per_token(config, context: int) -> float:
    """6N for the weights a token passes through (lm_head included, embedding lookup not) + attention scores."""
    # q, k, v (grouped k/v heads) and o projections
    attention = (
        config.hidden_size * config.head_dim * (config.num_heads + 2 * config.num_kv_heads) + config.hidden_size**2
    )
    mlp = 3 * config.hidden_size * config.intermediate_size
    per_layer = attention + mlp
    weights = config.num_layers * per_layer + config.hidden_size * config.vocab_size
    return 6 * weights + 12 * config.num_layers * context * config.hidden_size


def stepper(model, loss_fn, optimizer, batches, steps: int):
    def run() -> float:
        start = time.perf_counter()
        tokens = 0
        for index in range(steps):
            inputs, targets = batches[index % len(batches)]
            loss = loss_fn(model, inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += targets.numel()
        return tokens / (time.perf_counter() - start)

    return run


def ours_loss(model, inputs, targets):
    return causal_lm_loss(model, (inputs, targets))[0]


def hf_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    arguments = parser.parse_args()

    recipe = load_recipe(importlib.resources.files("lmforge.recipes") / "bench-small.yaml")
    config, context, batch_size = recipe.model, recipe.data.context, recipe.train.batch_size
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        window = torch.randint(0, config.vocab_size, (batch_size, context + 1), generator=generator)
        batches.append((window[:, :-1], window[:, 1:]))

    torch.manual_seed(0)
    ours = Decoder(config)
    reference = hf_model(config)
    reference.load_state_dict(to_llama_state(ours.state_dict()))
    contenders = {
        "lmforge": stepper(ours, ours_loss, build_optimizer(ours, recipe.train), batches, arguments.steps),
        "hf": stepper(reference, hf_loss, torch.optim.AdamW(reference.parameters(), lr=1e-3), batches, arguments.steps),
    }
    if arguments.compile:
        # As `train.compile: true` does: the whole loss function compiled, the model left eager.
        eager_ours, compiled_hf = Decoder(config), torch.compile(hf_model(config))
        contenders["lmforge+compile"] = stepper(
            eager_ours, torch.compile(ours_loss), build_optimizer(eager_ours, recipe.train), batches, arguments.steps
        )
        contenders["hf+compile"] = stepper(
            compiled_hf, hf_loss, torch.optim.AdamW(compiled_hf.parameters(), lr=1e-3), batches, arguments.steps
        )
    for run in contenders.values():  # warm-up: allocator, thread pool, compilation
        run()

    print(f"bench-small: {ours.num_parameters():,} parameters, batch {batch_size} x {context} tokens, fp32")
    results = interleaved(contenders, rounds=arguments.rounds)
    peak = measure_peak()["fp32_gflops"]
    flops = flops_per_token(config, context)
    rows = []
    for name, rates in results.items():
        median = sorted(rates)[len(rates) // 2]
        rows.append(
            [
                name,
                f"{median:,.0f}",
                f"{median_ratio(results, name, 'hf'):.2f}x",
                f"{median * flops / 1e9 / peak:.0%}",
            ]
        )
    print_table(["model", "tokens/s (median)", "vs hf eager", f"MFU (peak {peak:.0f} GFLOP/s)"], rows)
    if arguments.compile:
        print(f"lmforge+compile vs hf+compile: {median_ratio(results, 'lmforge+compile', 'hf+compile'):.2f}x (median)")


if __name__ == "__main__":
    main()
