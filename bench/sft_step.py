"""One chat SFT training step (forward, loss, backward) with lmforge's fused loss against full logits.

    python bench/sft_step.py [--model runs/demo] [--rounds 7] [--threads N]

Packed rows of the built-in instructions as `lmforge finetune --task chat` builds them (8 rows of the model's
context, loss on the assistant's tokens only, about 5% of them). lmforge: `chat_sft_loss`, whose fused output
layer and cross-entropy skip the unscored tokens; reference: the same model's full (tokens x vocab) logits and
`F.cross_entropy(..., ignore_index=-100)`, as a plain PyTorch training loop computes it. Both run on the same
weights and rows in interleaved rounds; the table gives steps/s and the median ratio. Without --model: the demo
shape with random weights and a tokenizer trained on a slice of the built-in news.
"""

import argparse
import importlib.resources
import time

import torch
import torch.nn.functional as F
from _common import interleaved, median_ratio, print_table

from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import load_model
from lmforge.models.decoder import Decoder
from lmforge.tasks import chat
from lmforge.tasks.causal_lm import load_recipe
from lmforge.tasks.examples import TaskData
from lmforge.train.objectives import chat_sft_loss


def demo_shaped(path: str | None) -> tuple[Decoder, Tokenizer]:
    if path:
        return load_model(path), Tokenizer.load(path)
    texts = [record_text(record) for _, record in zip(range(3000), read_split("builtin:peoples-daily", "train"))]
    tokenizer = Tokenizer.train(texts, vocab_size=8192, show_progress=False)
    config = load_recipe(importlib.resources.files("lmforge.recipes") / "demo.yaml").model
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return Decoder(config), tokenizer


def full_logits_loss(model: Decoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a decoder run folder (default: the demo shape, random weights)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model, tokenizer = demo_shaped(arguments.model)
    model.train()
    # A seeded sample across the file, as the demo's recipe draws it: the file starts with 35k reviews.
    records = chat.conversations(TaskData(source="builtin:instructions", max_train_examples=400), "train")
    rows = chat.packed_rows(tokenizer, records, model.config.max_position_embeddings, seed=0)
    batch = {name: tensor[:8] for name, tensor in rows.items()}
    scored = (batch["targets"] != -100).float().mean().item()

    def rate(loss_of) -> float:
        model.zero_grad()
        start = time.perf_counter()
        loss_of(model, batch).backward()
        return 1 / (time.perf_counter() - start)

    lmforge_loss = lambda model, batch: chat_sft_loss(model, batch)[0]  # noqa: E731
    rate(lmforge_loss), rate(full_logits_loss)  # warm-up
    results = interleaved({"lmforge": lambda: rate(lmforge_loss), "full logits": lambda: rate(full_logits_loss)},
                          arguments.rounds)  # fmt: skip
    rows_out = [[name, f"{sorted(rates)[len(rates) // 2]:.2f}"] for name, rates in results.items()]
    print_table(["loss", "steps/s (median)"], rows_out)
    ratio = median_ratio(results, "lmforge", "full logits")
    shape = f"8 rows of {batch['input_ids'].shape[1]} tokens, {scored:.1%} scored"
    print(f"lmforge vs full logits: {ratio:.2f}x (median ratio); {shape}; {arguments.threads} threads")


if __name__ == "__main__":
    main()
