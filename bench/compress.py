"""One model, compressed six ways: size on disk, greedy decoding tokens/s at batch 1 and 8, perplexity.

    python bench/compress.py [--model runs/demo] [--rounds 7] [--new-tokens 64] [--windows 32]
                             [--threads N] [--recover-steps 0] [--kernels]

Variants: fp32 (the run folder itself), bf16, int8, int8-dynamic, int4 (`lmforge quantize`) and 50% magnitude pruning
(`lmforge prune`, per layer; `--recover-steps N` adds a row with N steps of recovery fine-tuning), each
written to a temporary folder and loaded back through `lmforge.load`, as every command loads it.
Beside them, llama.cpp's batch-1 speed on the same model exported to GGUF (f16 and q8_0) when
llama-cpp-python is installed and `lmforge.export.gguf` exists. All variants decode the same prompts,
interleaved round by round; ratios are medians of per-round ratios against fp32. Perplexity is on the
first `--windows` context windows of builtin:peoples-daily's validation split.
`--compiled` adds rows decoding fp32, int8 and int4 with compiled steps (`generate --compile`; compiled before
timing). `--kernels` also times one layer's matrix product through each kernel at several row counts.
"""

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved, median_ratio, print_table

import lmforge
from lmforge.compress.prune import prune_run
from lmforge.compress.quantize import quantize_run
from lmforge.evaluate.perplexity import evaluate_source
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.models import load_model
from lmforge.models.quantized import Int4Linear, Int8Linear

PROMPTS = [
    "中国人民",
    "新华社北京１月１日电",
    "今年经济工作的",
    "国务院总理",
    "记者从国家统计局获悉",
    "在新的一年里",
    "据新华社报道",
    "改革开放以来",
]


def make_variants(model: Path, folder: Path, recover_steps: int) -> dict[str, Path]:
    variants = {"fp32": model}
    for method in ("bf16", "int8", "int8-dynamic", "int4"):
        quantize_run(model, folder / method, method)
        variants[method] = folder / method
    prune_run(model, folder / "pruned", 0.5, device="cpu", progress=False)
    variants["pruned 50%"] = folder / "pruned"
    if recover_steps:
        prune_run(model, folder / "recovered", 0.5, recover_steps=recover_steps, device="cpu", progress=False)
        variants[f"pruned 50% + {recover_steps} steps"] = folder / "recovered"
    return variants


def llama_cpp_models(model: Path, folder: Path, threads: int) -> dict:
    """{"llama.cpp f16": Llama, "llama.cpp q8_0": Llama}, or {} with the reason printed."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama-cpp-python is not installed; skipping its column")
        return {}
    if importlib.util.find_spec("lmforge.export.gguf") is None:
        print("llama.cpp: lmforge.export.gguf does not exist yet; skipping its column")
        return {}
    import llama_cpp

    from lmforge.export.gguf import export

    # NOTE: pip builds llama.cpp with -march=native; where the CPU advertises AMX but the kernel or a sandbox does
    # not grant tile state, its AMX buffers raise SIGILL. Loading without extra buffer types changes only speed.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffer_types
    models = {}
    for quant in ("f16", "q8_0"):
        path = export(model, folder / f"model-{quant}.gguf", quant=quant)
        models[f"llama.cpp {quant}"] = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, n_batch=256, n_threads=threads, seed=0, verbose=False
        )
    return models


COMPILED = ("fp32", "int8", "int4")  # int8-dynamic cannot be compiled (fbgemm's packed weights are opaque)


def ours_rate(lm: lmforge.LM, prompt_ids: list[list[int]], greedy: SamplingConfig, compiled: bool = False):
    if compiled:
        generate_ids(lm.model, prompt_ids, greedy, compiled=True)  # compile outside the timed rounds

    def run() -> float:
        start = time.perf_counter()
        outputs = generate_ids(lm.model, prompt_ids, greedy, compiled=compiled)
        return sum(len(output.token_ids) for output in outputs) / (time.perf_counter() - start)

    return run


def llama_greedy(llama, prompt_ids: list[int], new_tokens: int) -> list[int]:
    tokens = []
    for token in llama.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
    return tokens


def llama_rate(llama, prompt_ids: list[int], new_tokens: int):
    def run() -> float:
        start = time.perf_counter()
        tokens = llama_greedy(llama, prompt_ids, new_tokens)
        return len(tokens) / (time.perf_counter() - start)

    return run


def median(values: list[float]) -> float:
    return statistics.median(values)


def time_kernels(name: str, linear: torch.nn.Linear, rounds: int) -> None:
    int8, int4 = Int8Linear.from_linear(linear, dynamic_activations=True), Int4Linear.from_linear(linear, 32)
    weight = linear.weight.detach()

    def dynamic_int8(x):
        # Dynamic int8 activations, one scale per row: int8 x int8 -> int32 on oneDNN, then rescale.
        scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        quantized = torch.round(x / scales).to(torch.int8)
        return torch._int_mm(quantized, int8.qweight.t()) * scales * int8.scales

    kernels = {
        "fp32 F.linear": lambda x: F.linear(x, weight),
        "int8 packed kernel (bf16)": lambda x: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), int8.qweight, int8.kernel_scales
        ).float(),
        "int8 dequantize + F.linear": lambda x: F.linear(x, int8.dequantize()),
        "int8 dynamic, per row (torch._int_mm)": dynamic_int8,
        "int8 dynamic, per call (fbgemm)": lambda x: torch.ops.quantized.linear_dynamic(x, int8.dynamic_weight, True),
        "int4 packed kernel (bf16)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), int4.kernel_weight, 32, int4.kernel_scales_and_zeros
        ).float(),
        "int4 dequantize + F.linear": lambda x: F.linear(x, int4.dequantize()),
    }
    row_counts = (1, 8, 32, 256)
    rows = []
    for kernel, function in kernels.items():
        timings = []
        for count in row_counts:
            x = torch.randn(count, linear.in_features)
            repeats = max(2, 200 // count)
            with torch.inference_mode():
                function(x)
                samples = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    for _ in range(repeats):
                        function(x)
                    samples.append((time.perf_counter() - start) / repeats * 1e6)
            timings.append(f"{median(samples):,.0f}")
        rows.append([kernel, *timings])
    print(f"\n{name} ({linear.out_features} x {linear.in_features}), microseconds per call (median of {rounds}):")
    print_table(["kernel", *[f"{count} rows" for count in row_counts]], rows)


def kernel_table(model_dir: Path, rounds: int) -> None:
    """Microseconds per matrix product of one layer's weight, each kernel at several row counts.

    One weight used over and over stays in cache, so this shows compute and per-call costs, not the memory
    traffic a whole model's weights make in decoding; the decoding table below measures that.
    """
    model = load_model(model_dir)
    for name in ("layers.0.mlp.gate_proj", "lm_head"):
        time_kernels(name, model.get_submodule(name), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=32, help="validation windows for perplexity")
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    parser.add_argument("--recover-steps", type=int, default=0, help="add a pruned row with recovery fine-tuning")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel on one layer")
    parser.add_argument("--compiled", action="store_true", help="add rows decoding with compiled steps")
    arguments = parser.parse_args()

    if not (arguments.model / "config.json").is_file():
        print(f"no model at {arguments.model}: make one with `make demo` (or pass --model RUN_FOLDER)")
        sys.exit(1)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    threads = torch.get_num_threads()
    print(f"{arguments.model}, {threads} thread(s), torch {torch.__version__}")
    if arguments.kernels:
        kernel_table(arguments.model, arguments.rounds)

    with tempfile.TemporaryDirectory(prefix="lmforge-compress-") as scratch:
        folder = Path(scratch)
        variants = make_variants(arguments.model, folder, arguments.recover_steps)
        lms = {name: lmforge.load(path, device="cpu") for name, path in variants.items()}
        llamas = llama_cpp_models(arguments.model, folder, threads)
        sizes = {name: (path / "model.safetensors").stat().st_size for name, path in variants.items()}
        sizes.update({name: (folder / f"model-{name.split()[-1]}.gguf").stat().st_size for name in llamas})

        perplexity = {}
        for name, lm in lms.items():
            started = time.perf_counter()
            perplexity[name] = evaluate_source(lm, "builtin:peoples-daily", "valid", arguments.windows)["perplexity"]
            print(f"{name}: perplexity {perplexity[name]:.2f} ({time.perf_counter() - started:.1f} s)", flush=True)

        tokenizer = lms["fp32"].tokenizer
        prompt_ids = [lms["fp32"].encode_prompt(prompt) for prompt in PROMPTS]
        greedy = SamplingConfig(max_new_tokens=arguments.new_tokens, temperature=0, repetition_penalty=1.0)
        reference = generate_ids(lms["fp32"].model, prompt_ids[:1], greedy)[0].token_ids
        same = {name: generate_ids(lm.model, prompt_ids[:1], greedy)[0].token_ids for name, lm in lms.items()}
        compiled = [name for name in COMPILED if arguments.compiled]
        same.update(
            {f"{name} compiled": generate_ids(lms[name].model, prompt_ids[:1], greedy, compiled=True)[0].token_ids
             for name in compiled}
        )  # fmt: skip
        same.update({name: llama_greedy(llama, prompt_ids[0], arguments.new_tokens) for name, llama in llamas.items()})
        agreement = {name: sum(a == b for a, b in zip(tokens, reference)) for name, tokens in same.items()}
        print(f"batch-1 greedy continuation of {PROMPTS[0]!r} (fp32): {tokenizer.decode(reference)!r}")

        rates, ratios = {}, {}
        for batch_size in (1, 8):
            contenders = {name: ours_rate(lm, prompt_ids[:batch_size], greedy) for name, lm in lms.items()}
            contenders.update(
                {f"{name} compiled": ours_rate(lms[name], prompt_ids[:batch_size], greedy, compiled=True)
                 for name in compiled}
            )  # fmt: skip
            if batch_size == 1:
                contenders.update(
                    {name: llama_rate(llama, prompt_ids[0], arguments.new_tokens) for name, llama in llamas.items()}
                )
            print(f"batch {batch_size}, {arguments.new_tokens} new tokens per row:", flush=True)
            results = interleaved(contenders, rounds=arguments.rounds)
            rates[batch_size] = {name: median(values) for name, values in results.items()}
            ratios[batch_size] = {name: median_ratio(results, name, "fp32") for name in results}
            for name in compiled[1:]:
                ratio = median_ratio(results, f"{name} compiled", "fp32 compiled")
                print(f"  batch {batch_size}: {name} compiled vs fp32 compiled: {ratio:.2f}x (median ratio)")

    rows = []
    for name in [*lms, *(f"{name} compiled" for name in compiled), *llamas]:
        weights = name.removesuffix(" compiled")
        row = [name, f"{sizes[weights] / 1e6:.1f}", f"{sizes['fp32'] / sizes[weights]:.1f}x"]
        for batch_size in (1, 8):
            if name in rates[batch_size]:
                row += [f"{rates[batch_size][name]:,.0f}", f"{ratios[batch_size][name]:.2f}x"]
            else:
                row += ["-", "-"]
        if name in perplexity:
            row += [f"{perplexity[name]:.2f}", f"{100 * (perplexity[name] / perplexity['fp32'] - 1):+.2f}%"]
        else:
            row += ["-", "-"]
        row.append(f"{agreement[name]}/{len(reference)}")
        rows.append(row)
    print()
    print_table(
        ["variant", "MB on disk", "smaller", "tok/s b1", "vs fp32", "tok/s b8", "vs fp32", "perplexity", "vs fp32",
         "greedy = fp32"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
