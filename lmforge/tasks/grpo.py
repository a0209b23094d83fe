"""GRPO: reinforcement learning from verifiable rewards on a chat model (https://arxiv.org/abs/2402.03300).

For each prompt the policy (a copy of the chat model `--base`) samples a group of replies with the decoding
engine (generate/engine.py, batched with the KV cache); a verifier scores each reply (exact match, numeric
equality, a well-formed reply, or the right tool call, `VERIFIERS`, chosen per data set); each reply's
advantage is its reward standardised within its group; the loss is GRPO's clipped objective with a KL
penalty to the frozen starting model (`train/objectives.grpo_loss`). A sampled group is reused for
`updates_per_group` optimizer steps, so the ratio to the sampling policy moves and the clip matters.

Training goes through the one loop (train/trainer.py): `batch_for(index)` samples from the policy as it is
at that step with a generator seeded by the index, so a run resumed from a checkpoint on a group boundary
samples what the uninterrupted run did. Validation, from step 0, logs the held-out exact match of greedy
replies (overall and per kind), their length in tokens, their KL to the start, and the mean reward of the
groups sampled since the last validation; the report sets the result beside the starting model's.

Data: records with `messages` (the prompt is everything before the reply to the last user message) and
an `answer`; builtin:tools records also carry `tools` and the `calls` a correct reply makes.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import option
from lmforge.data.chat import check_messages, check_tools, parse_reply, same_answer, truncate_chat
from lmforge.data.sources import builtin_toolbox
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tools import TOOL_KINDS, Toolbox, call_reward
from lmforge.device import evaluating
from lmforge.errors import UserError
from lmforge.evaluate.report import plot_curves
from lmforge.generate.engine import generate_ids
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import load
from lmforge.models.decoder import Decoder
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.chat import SCORED_KINDS, linked_model, load_decoder_base, question_of, tuned_task_info
from lmforge.tasks.chat import Recipe as ChatRecipe
from lmforge.tasks.dpo import collate_replies
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.objectives import group_advantages, grpo_loss, token_logprobs
from lmforge.train.trainer import TrainConfig

FIELDS = ("messages",)
KEY_FIELD = "prompt"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Recipe(ChatRecipe):
    data: TaskData = option(
        TaskData(source="builtin:instructions", max_train_examples=4000, max_eval_examples=96),
        "prompts with checkable answers: builtin:instructions, builtin:tools, or a file of {messages, answer}",
    )
    base: str | None = option(None, "the chat model (run folder) to tune; it is also the frozen reference")
    train: TrainConfig = option(
        TrainConfig(max_steps=40, batch_size=32, lr=3e-5, warmup_steps=0, eval_every=10, save_every=10,
                    precision="fp32"),
        "optimisation; batch_size counts replies (batch_size / group_size prompts per micro-batch)",
    )  # fmt: skip
    group_size: int = option(8, "replies sampled per prompt")
    updates_per_group: int = option(2, "optimizer steps on each sampled group (1: strictly on-policy, no clipping)")
    oversample: int = option(
        1,
        "prompts sampled per group trained on: with N > 1, N times the prompts are sampled and groups whose "
        "rewards differ are trained on first (DAPO's dynamic sampling); 1: every sampled group is trained on",
    )
    temperature: float = option(1.0, "sampling temperature of the groups")
    max_new_tokens: int = option(32, "reply length limit, sampled and scored")
    clip: float = option(0.2, "the ratio to the sampling policy is clipped to 1 +- clip")
    kl_weight: float = option(0.04, "weight of the KL penalty to the starting model")
    verifier: str = option("auto", "exact, numeric, format, tool_call, or auto (tool_call for tool data, else exact)")

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.train.batch_size % self.group_size:
            raise ValueError(f"group_size must be >= 2 and divide train.batch_size ({self.train.batch_size}), "
                             f"not {self.group_size}")  # fmt: skip
        if min(self.updates_per_group, self.oversample) < 1 or self.temperature <= 0 or self.clip <= 0:
            raise ValueError("updates_per_group >= 1, oversample >= 1, temperature > 0 and clip > 0 are required")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, not {self.kl_weight}")
        if self.verifier not in ("auto", *VERIFIERS):
            raise ValueError(f"verifier must be auto or one of {', '.join(VERIFIERS)}, not {self.verifier!r}")


def _exact(reply: str, record: dict, toolbox: Toolbox) -> float:
    return float(same_answer(parse_reply(reply, parse_calls=False).content, record["answer"]))


def _numeric(reply: str, record: dict, toolbox: Toolbox) -> float:
    found, expected = NUMBER.findall(parse_reply(reply).content), NUMBER.findall(str(record["answer"]))
    return float(bool(found and expected) and float(found[0]) == float(expected[0]))


def _format(reply: str, record: dict, toolbox: Toolbox) -> float:
    """A reply with content or well-formed calls, and no stray markup (half a tag, an unclosed trace)."""
    parsed = parse_reply(reply)
    return float(bool(parsed.content or parsed.tool_calls) and "<" not in parsed.content)


# A verifier: (reply text, record, the built-in tools) -> reward in [0, 1]. Add one here to use it by name.
VERIFIERS: dict[str, Callable[[str, dict, Toolbox], float]] = {
    "exact": _exact, "numeric": _numeric, "format": _format, "tool_call": call_reward,
}  # fmt: skip


@dataclass
class Prompt:
    record: dict
    ids: list[int]  # the prompt, the assistant's turn opened
    kind: str


def prompts(tokenizer: Tokenizer, data: TaskData, split: str, length: int) -> list[Prompt]:
    """The split's checkable records as prompts (the messages before the reply to the last user message)."""
    found = []
    for number, record in enumerate(task_records(data, split, FIELDS, key_field=KEY_FIELD), start=1):
        kind = record.get("kind", "answer")
        if kind not in (*SCORED_KINDS, *TOOL_KINDS, "answer") or "answer" not in record:
            continue  # e.g. continuations: no one right answer to reward
        where = f"record {number} of {data.source} ({split})"
        messages = check_messages(record["messages"], where)
        question = question_of(messages)
        try:
            _, tokens = truncate_chat(tokenizer, question, length, True, check_tools(record.get("tools")))
        except UserError:
            continue  # too long for the context with room for a reply
        found.append(Prompt(record, tokens.ids, kind))
    if not found:
        raise UserError(f"{data.source} ({split}) has no record with a checkable answer that fits the context")
    return found


def pick_verifier(name: str, data: TaskData, records: list[Prompt]) -> Callable[[str, dict], float]:
    if name == "auto":
        name = "tool_call" if any("calls" in prompt.record for prompt in records) else "exact"
    verify, toolbox = VERIFIERS[name], builtin_toolbox()

    def checked(reply: str, record: dict) -> float:
        try:
            return float(verify(reply, record, toolbox))
        except Exception as error:  # a verifier is the user's code too: its failure is one line, not a traceback
            raise UserError(f"verifier {name!r} failed on a reply to {record.get('prompt', '?')!r:.60}: "
                            f"{type(error).__name__}: {error}") from None  # fmt: skip

    return checked


class GroupSampler:
    """Micro-batch index -> a batch of sampled groups with rewards, advantages and log-probabilities."""

    def __init__(self, model: Decoder, reference: Decoder, tokenizer: Tokenizer, train_prompts: list[Prompt],
                 recipe: Recipe, verify: Callable[[str, dict], float]) -> None:  # fmt: skip
        self.model, self.reference, self.tokenizer, self.recipe, self.verify = (
            model,
            reference,
            tokenizer,
            recipe,
            verify,
        )
        self.groups = recipe.train.batch_size // recipe.group_size  # trained on per micro-batch
        self.batches = ExampleBatches(train_prompts, self.groups * recipe.oversample, self._sample, recipe.train.seed)
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.rewards: list[float] = []  # of the groups sampled since the last validation

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        accumulate = self.recipe.train.grad_accum
        step, micro = divmod(index, accumulate)
        key = (step // self.recipe.updates_per_group) * accumulate + micro  # the same groups for that many steps
        if key not in self.cache:
            self.cache = {k: v for k, v in self.cache.items() if k >= key - accumulate}
            self.cache[key] = self.batches.batch(key)
        return self.cache[key]

    def _sample(self, picked: list[Prompt], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        recipe, tokenizer, size = self.recipe, self.tokenizer, self.recipe.group_size
        config = SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature, top_k=0,
                                top_p=1.0, repetition_penalty=1.0, seed=int(rng.integers(2**31)))  # fmt: skip
        rows = [prompt for prompt in picked for _ in range(size)]  # each group's replies side by side
        with evaluating(self.model):
            generations = generate_ids(self.model, [p.ids for p in rows], config,
                                       (tokenizer.im_end_id, tokenizer.eos_id), tokenizer.pad_id)  # fmt: skip
        rewards = [self.verify(tokenizer.decode(g.token_ids), p.record) for g, p in zip(generations, rows)]
        self.rewards += rewards
        kept = [row for group in self._kept_groups(rewards) for row in range(group * size, (group + 1) * size)]
        rows, generations, rewards = [rows[i] for i in kept], [generations[i] for i in kept], [rewards[i] for i in kept]
        # A reply that ended by itself learns its end marker too.
        replies = [g.token_ids + ([tokenizer.im_end_id] if g.finish_reason == "stop" else []) for g in generations]
        batch = collate_replies([(p.ids, reply) for p, reply in zip(rows, replies)], tokenizer.pad_id)
        device = self.model.embed_tokens.weight.device
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with evaluating(self.model):
            batch["old_logprobs"] = token_logprobs(self.model, batch)  # (rows, T)
            batch["ref_logprobs"] = token_logprobs(self.reference, batch)
        batch["advantages"] = group_advantages(torch.tensor(rewards), size).to(device)  # (rows,)
        return batch

    def _kept_groups(self, rewards: list[float]) -> list[int]:
        """The groups to train on: those whose rewards differ first (the rest teach nothing but the KL term), in
        sampling order, as many as a micro-batch holds."""
        size = self.recipe.group_size
        grouped = [rewards[start : start + size] for start in range(0, len(rewards), size)]
        informative = [index for index, group in enumerate(grouped) if min(group) != max(group)]
        rest = [index for index in range(len(grouped)) if index not in informative]
        return sorted((informative + rest)[: self.groups])

    def validate(self, model: Decoder, held_out: list[Prompt]) -> dict[str, float]:
        scores = greedy_scores(model, self.tokenizer, held_out, self.verify, self.recipe.max_new_tokens, self.reference)
        if self.rewards:
            scores["reward"] = float(np.mean(self.rewards))
            self.rewards = []
        return scores


def greedy_scores(
    model: Decoder,
    tokenizer: Tokenizer,
    held_out: list[Prompt],
    verify: Callable[[str, dict], float],
    max_new_tokens: int,
    reference: Decoder | None = None,
) -> dict[str, float]:
    """Mean verifier reward of greedy replies (exact match), overall and per kind; their length; KL to `reference`."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    with evaluating(model):
        generations = generate_ids(model, [p.ids for p in held_out], greedy,
                                   (tokenizer.im_end_id, tokenizer.eos_id), tokenizer.pad_id)  # fmt: skip
    hits: dict[str, list[float]] = defaultdict(list)
    for prompt, generation in zip(held_out, generations):
        reward = verify(tokenizer.decode(generation.token_ids), prompt.record)
        hits["accuracy"].append(reward)
        hits[f"accuracy_{prompt.kind}"].append(reward)
    scores = {name: float(np.mean(values)) for name, values in sorted(hits.items())}
    scores["length"] = float(np.mean([len(g.token_ids) for g in generations]))
    if reference is not None:
        batch = collate_replies([(p.ids, g.token_ids or [tokenizer.im_end_id]) for p, g in zip(held_out, generations)],
                                tokenizer.pad_id)  # fmt: skip
        batch = {name: tensor.to(model.embed_tokens.weight.device) for name, tensor in batch.items()}
        with evaluating(model):
            to_reference = token_logprobs(reference, batch) - token_logprobs(model, batch)  # (rows, T)
        scored = batch["targets"] != -100
        scores["kl"] = float(((torch.exp(to_reference) - to_reference - 1) * scored).sum() / scored.sum())
    return scores


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """The policy (`recipe.base`, adapters when LoRA is on), its frozen copy, and a sampler of groups."""
    model, tokenizer = load_decoder_base(recipe.base, setup.device, "GRPO")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    context = model.config.max_position_embeddings
    length = min(recipe.max_length or context, context) - recipe.max_new_tokens
    train_prompts = prompts(tokenizer, recipe.data, "train", length)
    held_out = prompts(tokenizer, recipe.data, "valid", length)[: recipe.data.max_eval_examples or None]
    verify = pick_verifier(recipe.verifier, recipe.data, train_prompts)
    task = {"task": "grpo", "base": str(recipe.base), "verifier": recipe.verifier, "group_size": recipe.group_size}
    task_info = tuned_task_info(model, recipe.lora, task, recipe.train.seed)
    print(f"GRPO: {len(train_prompts):,} training prompts, {len(held_out)} held out, groups of {recipe.group_size}")
    sampler = GroupSampler(model, reference, tokenizer, train_prompts, recipe, verify)
    return Training(
        model,
        tokenizer,
        sampler.batch,
        functools.partial(sampler.validate, held_out=held_out),
        task_info,
        max_length=context,
        title=f"GRPO on {recipe.data.source}",
        objective_options={"clip": recipe.clip, "kl_weight": recipe.kl_weight},
        generation=recipe.generation,
        lora=recipe.lora if recipe.lora.enabled else None,
        evaluate_options={"max_new_tokens": recipe.max_new_tokens, "verifier": recipe.verifier},
    )


def plot_rewards(records: list[dict], path: Path) -> bool:
    """Held-out exact match and the sampled groups' mean reward against the step."""
    labels = {"accuracy": "held-out exact match (greedy)", "reward": "mean reward of sampled groups"}
    curves = {label: [(r["step"], r[f"valid_{name}"]) for r in records if f"valid_{name}" in r]
              for name, label in labels.items()}  # fmt: skip
    return plot_curves(curves, path, "reward", "GRPO")


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    max_new_tokens: int = 32,
    verifier: str = "auto",
) -> dict:
    """Held-out exact match (the verifier's reward of greedy replies), per kind, beside the starting model's."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    base = linked_model(RunFolder(model_dir).read_task(default={}))
    base_lm = load(base) if base is not None else None
    context = lm.model.config.max_position_embeddings
    held_out = prompts(lm.tokenizer, data, split, context - max_new_tokens)
    verify = pick_verifier(verifier, data, held_out)
    reference = base_lm.model if base_lm is not None else None
    scores = greedy_scores(lm.model, lm.tokenizer, held_out, verify, max_new_tokens, reference)
    systems = [("lmforge GRPO model (greedy)", scores)]
    if base_lm is not None:
        systems.append((f"starting model ({base})", greedy_scores(base_lm.model, lm.tokenizer, held_out, verify,
                                                                  max_new_tokens)))  # fmt: skip
    kinds = sorted(k for k in scores if k.startswith("accuracy_"))
    columns = [("accuracy", "exact match"), *((k, k.removeprefix("accuracy_")) for k in kinds)]
    columns += [("length", "reply tokens"), ("kl", "KL to the start")]
    metrics = {**scores, "prompts": len(held_out), "baselines": dict(systems[1:])}
    notes = ["Exact match: the verifier's reward of the greedy reply to each held-out prompt (for tool data: the "
             "first call made right, or the right answer without a call where none is needed)."]  # fmt: skip
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(f"Training took {training_minutes:.1f} minutes. Loss: ![loss]({RunFolder.LOSS_PLOT})")
        if plot_rewards(RunFolder(model_dir).read_metrics_log(), out_dir / "grpo_rewards.png"):
            notes.append("Rewards during training: ![rewards](grpo_rewards.png)")
    write_task_report(out_dir, f"grpo — {model_dir}", metrics, systems, columns, [],
                      describe_split(data, split, KEY_FIELD), notes)  # fmt: skip
    return metrics


TASK = Task(
    name="grpo",
    Recipe=Recipe,
    fields=FIELDS,
    family="decoder",
    objective=grpo_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
