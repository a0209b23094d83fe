"""Preference tuning with DPO (https://arxiv.org/abs/2305.18290) on {messages, chosen, rejected} records.

The policy starts as a copy of the chat model (`--base`) and learns to raise
the likelihood of the chosen reply over the rejected one relative to the frozen
original, the reference: loss = -log sigmoid(beta * ((log pi(chosen) - log
ref(chosen)) - (log pi(rejected) - log ref(rejected)))). The report follows the
preference accuracy on held-out pairs (how often the model gives the chosen
reply the higher log-likelihood) from step 0 on, and, for the built-in pairs
whose chosen reply is the checkable correct answer, the exact-match accuracy of
greedy replies before and after.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import option
from lmforge.data.batches import IGNORE_INDEX
from lmforge.data.chat import check_messages, truncate_chat
from lmforge.data.instructions import CHECKABLE_KINDS
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import evaluating
from lmforge.errors import UserError
from lmforge.evaluate.report import plot_curves
from lmforge.lm import load
from lmforge.models.decoder import Decoder
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.chat import (
    TuningRecipe,
    fits_context,
    instruction_accuracy,
    linked_model,
    load_decoder_base,
    tuned_task_info,
)
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    report_folders,
    split_file,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import dpo_loss, sequence_logprobs
from lmforge.train.trainer import TrainConfig

FIELDS = ("messages", "chosen", "rejected")
KEY_FIELD = "prompt"


@dataclass
class Recipe(TuningRecipe):
    data: TaskData = option(
        TaskData(source="builtin:preferences", max_eval_examples=200),
        "preference pairs: builtin:preferences, a folder with preference_train/preference_test.jsonl, or a file",
    )
    base: str | None = option(None, "the chat model (run folder) to tune; it is also the frozen reference")
    train: TrainConfig = option(
        TrainConfig(max_steps=150, batch_size=8, lr=5e-5, warmup_steps=10, eval_every=25, save_every=50),
        "optimisation",
    )
    beta: float = option(0.1, "DPO temperature: how far the policy may move from the reference")
    sft_weight: float = option(0.0, "weight of a cross-entropy term on the chosen reply (RPO); 0 = plain DPO")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, not {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, not {self.sft_weight}")


def preference_records(data: TaskData, split: str) -> list[dict]:
    """Checked pairs. A folder in ../shared/data/chat's layout holds preference_train.jsonl and
    preference_test.jsonl; its test file also serves as the held-out set during training."""
    folder_file = split_file(data.source, "preference_train")
    if folder_file is not None and folder_file.is_file():
        name = "preference_train" if split == "train" else "preference_test"
        data = TaskData(source=str(Path(data.source) / f"{name}.jsonl"), valid_fraction=0.0, test_fraction=0.0)
        split = "train"  # the whole file
    records = task_records(data, split, FIELDS, key_field=KEY_FIELD)
    for number, record in enumerate(records, start=1):
        messages = check_messages(record["messages"], f"record {number} of {data.source} ({split})")
        if messages[-1]["role"] != "user":
            raise UserError(f"record {number} of {data.source} ({split}): the messages must end with a user turn")
    return records


Pair = tuple[list[int], list[int], list[int]]  # prompt ids, chosen reply ids, rejected reply ids


def encode_pairs(tokenizer: Tokenizer, records: list[dict], length: int) -> list[Pair]:
    """(prompt ids, chosen ids, rejected ids) per pair; replies end with <|im_end|>; oldest turns dropped to fit."""
    pairs = []
    for record in records:
        replies = [tokenizer.encode(record[key]) + [tokenizer.im_end_id] for key in ("chosen", "rejected")]
        budget = length - max(len(reply) for reply in replies)
        if budget < 8:
            continue
        try:
            _, prompt = truncate_chat(tokenizer, record["messages"], budget, add_generation_prompt=True)
        except UserError:
            continue
        pairs.append((prompt.ids, *replies))
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected; targets only on the replies."""
    chosen = [(prompt, reply) for prompt, reply, _ in pairs]
    return collate_replies(chosen + [(prompt, reply) for prompt, _, reply in pairs], pad_id)


def collate_replies(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, reply ids) rows, right-padded: input_ids, attention_mask, targets (B, T) only on the replies."""
    length = max(len(prompt) + len(reply) for prompt, reply in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, reply) in enumerate(sequences):
        ids = prompt + reply
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # Position t predicts token t + 1: the reply's tokens are predicted from len(prompt) - 1 on.
        targets[row, len(prompt) - 1 : len(ids) - 1] = torch.tensor(reply)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def preference_scores(
    model: Decoder, reference: Decoder | None, pairs: list, pad_id: int, beta: float, batch_size: int = 16
) -> dict[str, float]:
    """Held-out preference accuracy (chosen more likely than rejected); with a reference, DPO's reward accuracy too."""
    device = model.embed_tokens.weight.device
    prefers, rewards, margins = [], [], []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id).items()}
            policy = sequence_logprobs(model, batch)  # (2B,)
            half = policy.shape[0] // 2
            prefers += (policy[:half] > policy[half:]).tolist()
            if reference is not None:
                anchor = sequence_logprobs(reference, batch)
                margin = beta * ((policy[:half] - anchor[:half]) - (policy[half:] - anchor[half:]))
                rewards += (margin > 0).tolist()
                margins += margin.tolist()
    scores = {"preference_accuracy": sum(prefers) / len(prefers)}
    if reference is not None:
        scores["reward_accuracy"] = sum(rewards) / len(rewards)
        scores["reward_margin"] = sum(margins) / len(margins)
    return scores


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """The policy (`recipe.base`, with adapters when LoRA is on), its frozen copy as the reference, encoded pairs."""
    model, tokenizer = load_decoder_base(recipe.base, setup.device, "preference tuning")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    length = min(recipe.max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    train_pairs = encode_pairs(tokenizer, preference_records(recipe.data, "train"), length)
    valid_pairs = encode_pairs(tokenizer, preference_records(recipe.data, "valid"), length)[:200]
    if not train_pairs or not valid_pairs:
        raise UserError(f"no preference pair of {recipe.data.source} fits in {length} tokens")
    task = {"task": "dpo", "base": str(recipe.base), "beta": recipe.beta}
    task_info = tuned_task_info(model, recipe.lora, task, recipe.train.seed)
    print(f"DPO: {len(train_pairs):,} training pairs")
    collate = functools.partial(_collate, pad_id=tokenizer.pad_id)
    batches = ExampleBatches(train_pairs, recipe.train.batch_size, collate, recipe.train.seed)
    validate = functools.partial(
        preference_scores, reference=reference, pairs=valid_pairs, pad_id=tokenizer.pad_id, beta=recipe.beta
    )
    return Training(
        model,
        tokenizer,
        batches.batch,
        validate,
        task_info,
        max_length=model.config.max_position_embeddings,
        title=f"DPO on {recipe.data.source}",
        objective_options={"reference": reference, "beta": recipe.beta, "sft_weight": recipe.sft_weight},
        generation=recipe.generation,
        lora=recipe.lora if recipe.lora.enabled else None,
        evaluate_options={"max_new_tokens": recipe.max_new_tokens},
    )


def _collate(pairs: list, rng, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_pairs(pairs, pad_id)


def plot_preference_curve(records: list[dict], path: Path) -> bool:
    points = [(r["step"], r["valid_preference_accuracy"]) for r in records if "valid_preference_accuracy" in r]
    title = "DPO: chosen more likely than rejected"
    return plot_curves({"held-out preference accuracy": points}, path, "held-out preference accuracy", title)


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    max_new_tokens: int = 48,
) -> dict:
    """Held-out preference accuracy beside the base model's; exact-match accuracy where answers are checkable."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    task = RunFolder(model_dir).read_task(default={})
    base = linked_model(task)
    base_lm = load(base) if base is not None else None
    beta = task.get("beta", 0.1)
    records = preference_records(data, split)
    length = lm.model.config.max_position_embeddings
    pairs = encode_pairs(lm.tokenizer, records, length)
    reference = base_lm.model if base_lm is not None else None
    scores = preference_scores(lm.model, reference, pairs, lm.tokenizer.pad_id, beta)
    systems = [("lmforge DPO model", scores)]
    if base_lm is not None:
        systems.append((f"base model before DPO ({base})", preference_scores(base_lm.model, None, pairs, 0, beta)))
    checkable = [
        {**r, "messages": [*r["messages"], {"role": "assistant", "content": r["chosen"]}], "answer": r["chosen"]}
        for r in records
        if r.get("kind") in CHECKABLE_KINDS and fits_context(lm, r["messages"], max_new_tokens)
    ]
    replies: list[str] = []
    if checkable:
        accuracy, replies = instruction_accuracy(lm, checkable, max_new_tokens)
        systems[0][1].update({"exact_match": accuracy["accuracy"]})
        if base_lm is not None:
            base_accuracy, _ = instruction_accuracy(base_lm, checkable, max_new_tokens)
            systems[1][1].update({"exact_match": base_accuracy["accuracy"]})
    columns = [("preference_accuracy", "preference accuracy"), ("reward_accuracy", "reward accuracy")]
    columns += [("reward_margin", "mean reward margin"), ("exact_match", "exact match (greedy)")]
    examples = [
        {"prompt": r["messages"][-1]["content"][:80], "chosen": r["chosen"][:60], "rejected": r["rejected"][:60],
         "output": reply[:60]}
        for r, reply in zip(checkable[:8], replies[:8])
    ]  # fmt: skip
    notes = [
        "Preference accuracy: share of held-out pairs where the model gives the chosen reply a higher total "
        "log-likelihood than the rejected one. Reward accuracy: share where DPO's implicit reward "
        "(beta x log-ratio to the reference) favours the chosen reply; 0 at the start by construction.",
    ]
    metrics = {**scores, "pairs": len(pairs), "baselines": dict(systems[1:])}
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(f"Training took {training_minutes:.1f} minutes. Loss: ![loss]({RunFolder.LOSS_PLOT})")
        if plot_preference_curve(RunFolder(model_dir).read_metrics_log(), out_dir / "preference_accuracy.png"):
            notes.append("Held-out preference accuracy during training: ![curve](preference_accuracy.png)")
    write_task_report(
        out_dir, f"dpo — {model_dir}", metrics, systems, columns, examples, describe_split(data, split, KEY_FIELD),
        notes,
    )  # fmt: skip
    return metrics


TASK = Task(
    name="dpo",
    Recipe=Recipe,
    fields=FIELDS,
    family="decoder",
    objective=dpo_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
