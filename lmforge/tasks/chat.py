"""Chat: supervised fine-tuning of a pretrained decoder on conversations, with LoRA as an option.

Conversations (`{messages: [{role, content}, ...]}`, ending with the assistant)
are rendered with the chat template; only the assistant's tokens carry loss.
Several conversations are packed into each training row, and attention never
crosses from one to the next (`segment_ids`), so packing changes speed, not
results. The report gives the loss on held-out assistant tokens and, for data
with checkable answers (`builtin:instructions`), the exact-match accuracy of the
model's greedy replies, per kind of instruction, beside the base model's.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import option
from lmforge.data.batches import IGNORE_INDEX, pack_documents
from lmforge.data.chat import chat_template, check_messages, check_tools, parse_reply, same_answer, truncate_chat
from lmforge.data.instructions import CHECKABLE_KINDS
from lmforge.data.sources import builtin_toolbox
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tools import call_reward
from lmforge.device import evaluating
from lmforge.errors import UserError
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import LM, load
from lmforge.models import load_model
from lmforge.models.decoder import Decoder
from lmforge.models.lora import LoRAConfig
from lmforge.run_folder import RunFolder
from lmforge.tasks.base import Setup, Task, Training
from lmforge.tasks.examples import (
    ExampleBatches,
    TaskData,
    describe_split,
    in_batches,
    report_folders,
    task_records,
    write_task_report,
)
from lmforge.train.lora import apply_lora, lora_parameters
from lmforge.train.objectives import chat_sft_loss
from lmforge.train.trainer import TrainConfig

FIELDS = ("messages",)
KEY_FIELD = "prompt"  # what a single-file source is split by (builtin:instructions has it)
VALID_ROWS = 32
MAX_TOOL_RECORDS = 200  # held-out tool conversations scored, each up to 3 greedy replies
TOOL_COLUMNS = (("tool_call_accuracy", "first call right"), ("answer_accuracy", "final answer right (tools run)"))


@dataclass
class Recipe:
    """Chat SFT; also the keys every tuning of a chat model shares (DPO's recipe extends it)."""

    data: TaskData = option(
        TaskData(source="builtin:instructions", max_eval_examples=300),
        "conversations: builtin:instructions, a folder of train/valid/test.jsonl ({messages}), or a file",
    )
    base: str | None = option(None, "the pretrained decoder (run folder) to fine-tune")
    max_length: int = option(0, "tokens per training sequence (0 = the base model's context)")
    lora: LoRAConfig = option(LoRAConfig(), "low-rank adapters; rank 0 trains every weight")
    train: TrainConfig = option(
        TrainConfig(max_steps=300, batch_size=8, lr=5e-4, warmup_steps=20, eval_every=100, save_every=100),
        "optimisation",
    )
    generation: SamplingConfig = option(SamplingConfig(), "sampling defaults saved with the tuned model")
    max_new_tokens: int = option(48, "reply length limit when scoring checkable answers")
    trace_loss: bool = option(True, "learn the <think> reasoning traces too (false: loss on the answers only)")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


def conversations(data: TaskData, split: str) -> list[dict]:
    """The split's records, each checked to be a conversation that ends with an assistant reply (and its
    `tools`, when it offers some, checked as signatures)."""
    records = task_records(data, split, FIELDS, key_field=KEY_FIELD)
    for number, record in enumerate(records, start=1):
        where = f"record {number} of {data.source} ({split})"
        record["messages"] = check_messages(record["messages"], where)
        if record["messages"][-1]["role"] != "assistant":
            raise UserError(f"{where} does not end with an assistant message")
        try:
            record["tools"] = check_tools(record.get("tools"))
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
    return records


def encode_conversations(
    tokenizer: Tokenizer, records: list[dict], length: int, trace_loss: bool = True
) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss_mask) per conversation, oldest turns dropped to fit; ones whose last turn cannot fit are left out."""
    documents = []
    for record in records:
        try:
            _, tokens = truncate_chat(tokenizer, record["messages"], length, tools=record.get("tools"),
                                      trace_loss=trace_loss)  # fmt: skip
        except UserError:
            continue
        if any(tokens.loss_mask):
            documents.append((tokens.ids, tokens.loss_mask))
    return documents


def packed_rows(
    tokenizer: Tokenizer, records: list[dict], length: int, seed: int, trace_loss: bool = True
) -> dict[str, torch.Tensor]:
    documents = encode_conversations(tokenizer, records, length, trace_loss)
    if not documents:
        raise UserError(f"no conversation fits in {length} tokens")
    if len(documents) < len(records):
        print(f"left out {len(records) - len(documents):,} of {len(records):,} conversations: their last turn alone "
              f"is longer than {length} tokens")  # fmt: skip
    # Shuffled before packing, so a row mixes kinds of conversation instead of following the file order.
    order = np.random.default_rng(seed).permutation(len(documents))
    return pack_documents([documents[i] for i in order], length, tokenizer.pad_id)


def assistant_loss(model: Decoder, rows: dict[str, torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy (and perplexity) over the assistant tokens of packed rows."""
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(rows["input_ids"]), batch_size):
            batch = {name: tensor[start : start + batch_size].to(device) for name, tensor in rows.items()}
            loss, _ = chat_sft_loss(model, batch)
            tokens = int((batch["targets"] != IGNORE_INDEX).sum())
            total += float(loss) * tokens
            count += tokens
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": float(np.exp(mean))}


def load_decoder_base(base: str | None, device: torch.device, task: str) -> tuple[Decoder, Tokenizer]:
    """The decoder and tokenizer a fine-tuning task starts from; its tokenizer must have a chat template."""
    if not base:
        raise UserError(f"{task} needs a decoder to start from: --base RUN_FOLDER (e.g. runs/demo)")
    model = load_model(base, device)
    if not isinstance(model, Decoder):
        raise UserError(f"{base} is not a decoder; {task} needs one (e.g. lmforge demo's run)")
    tokenizer = Tokenizer.load(base)
    tokenizer.chat_template = chat_template(tokenizer)
    return model, tokenizer


def tuned_task_info(model: Decoder, lora: LoRAConfig, task: dict, seed: int) -> dict:
    """Adapters on `model` when LoRA is on; task.json with the trainable and the (merged) model's parameter counts."""
    parameters = model.num_parameters()  # before adapters: what the merged model will have
    if lora.enabled:
        torch.manual_seed(seed)  # the adapters' random start, so a recipe repeats exactly
        apply_lora(model, lora)
    trainable, total = lora_parameters(model)
    print(f"{task['task']}: {trainable:,} of {total:,} parameters trainable ({trainable / total:.1%}) "
          f"on {model.embed_tokens.weight.device}")  # fmt: skip
    return {**task, "trainable_parameters": trainable, "parameters": parameters}


def prepare(recipe: Recipe, setup: Setup) -> Training:
    """`recipe.base` (with adapters when LoRA is on) and packed rows of conversations."""
    model, tokenizer = load_decoder_base(recipe.base, setup.device, "chat fine-tuning")
    context = model.config.max_position_embeddings
    length = min(recipe.max_length or context, context)
    seed = recipe.train.seed
    train_rows = packed_rows(tokenizer, conversations(recipe.data, "train"), length, seed, recipe.trace_loss)
    valid_rows = packed_rows(tokenizer, conversations(recipe.data, "valid"), length, seed, recipe.trace_loss)
    valid_rows = {name: tensor[:VALID_ROWS] for name, tensor in valid_rows.items()}
    task_info = tuned_task_info(model, recipe.lora, {"task": "chat", "base": str(recipe.base)}, seed)
    print(f"chat fine-tuning: {len(train_rows['input_ids']):,} packed rows of {length} tokens")
    batches = ExampleBatches(range(len(train_rows["input_ids"])), recipe.train.batch_size, _stack(train_rows), seed)
    return Training(
        model,
        tokenizer,
        batches.batch,
        functools.partial(assistant_loss, rows=valid_rows),
        task_info,
        max_length=context,
        title=f"chat SFT on {recipe.data.source}",
        generation=recipe.generation,
        lora=recipe.lora if recipe.lora.enabled else None,
        evaluate_options={"max_new_tokens": recipe.max_new_tokens},
    )


def _stack(rows: dict[str, torch.Tensor]):
    def collate(indices: list[int], rng) -> dict[str, torch.Tensor]:
        picked = torch.as_tensor(indices)
        return {name: tensor[picked] for name, tensor in rows.items()}

    return collate


def instruction_accuracy(
    lm: LM, records: list[dict], max_new_tokens: int = 48, batch_size: int = 32
) -> tuple[dict[str, float], list[str]]:
    """Exact-match accuracy of greedy replies to each record's last turn: overall and per kind; and the replies."""
    order = sorted(range(len(records)), key=lambda i: len(str(records[i]["messages"])))
    replies = [""] * len(records)
    for chunk in in_batches(order, batch_size):
        completions = lm.chat_complete(
            [records[i]["messages"][:-1] for i in chunk],
            temperature=0.0,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
        )
        for index, completion in zip(chunk, completions):
            replies[index] = completion.text
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, reply in zip(records, replies):
        correct = same_answer(reply, record["answer"])
        hits["accuracy"].append(correct)
        hits[f"accuracy_{record['kind']}"].append(correct)
    return {name: float(np.mean(values)) for name, values in sorted(hits.items())}, replies


def question_of(messages: list[dict]) -> list[dict]:
    """The conversation up to its last user message: what a model is asked to answer."""
    return messages[: max(i for i, message in enumerate(messages) if message["role"] == "user") + 1]


def tool_accuracy(lm: LM, records: list[dict], max_new_tokens: int = 48, rounds: int = 3) -> dict[str, float]:
    """On records with `tools` and the `calls` a right reply makes (builtin:tools): how often the first greedy
    reply makes the right call (or rightly none), and how often the final answer is right when the model's calls
    are run by the built-in tools and their results fed back, over at most `rounds` replies."""
    toolbox = builtin_toolbox()
    asked = [question_of(record["messages"]) for record in records]
    finals: list[str | None] = [None] * len(records)
    first_calls = [0.0] * len(records)
    for number in range(rounds):
        live = []
        for i, final in enumerate(finals):
            if final is None and not fits_context(lm, asked[i], max_new_tokens, records[i]["tools"]):
                finals[i] = ""  # the conversation outgrew the context: no answer
            elif final is None:
                live.append(i)
        if not live:
            break
        completions = lm.chat_complete(
            [asked[i] for i in live], tools=[records[i]["tools"] for i in live], temperature=0.0,
            repetition_penalty=1.0, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        for i, completion in zip(live, completions):
            if number == 0:
                first_calls[i] = call_reward(completion.text, records[i], toolbox)
            names = [tool["function"]["name"] for tool in records[i]["tools"] or []]
            reply = parse_reply(completion.text, known=names)
            if reply.tool_calls and number < rounds - 1:
                asked[i] = asked[i] + toolbox.answer(reply.tool_calls, f"call_{number}")
            else:
                finals[i] = reply.content
    right = [same_answer(final or "", record["answer"]) for final, record in zip(finals, records)]
    return {"tool_call_accuracy": float(np.mean(first_calls)), "answer_accuracy": float(np.mean(right))}


def evaluate_run(
    model_dir: str | Path,
    data: TaskData,
    split: str = "test",
    out_dir: str | Path | None = None,
    training_minutes: float | None = None,
    progress: bool = True,
    max_new_tokens: int = 48,
) -> dict:
    """Held-out assistant-token loss, and exact-match accuracy where the data has checkable answers."""
    model_dir, out_dir = report_folders(model_dir, out_dir)
    lm = load(model_dir)
    records = conversations(data, split)
    length = lm.model.config.max_position_embeddings
    rows = packed_rows(lm.tokenizer, records, length, seed=0)
    scores = {f"assistant_{k}": v for k, v in assistant_loss(lm.model, rows).items()}
    base = linked_model(RunFolder(model_dir).read_task(default={}))
    base_lm = load(base) if base is not None else None
    base_scores = {f"assistant_{k}": v for k, v in assistant_loss(base_lm.model, rows).items()} if base_lm else {}
    fitting = [r for r in records if fits_context(lm, r["messages"][:-1], max_new_tokens)]
    checkable = [r for r in fitting if r.get("answer") and r.get("kind") in CHECKABLE_KINDS]
    shown = checkable or fitting
    if checkable:
        accuracy, replies = instruction_accuracy(lm, checkable, max_new_tokens)
        scores.update(accuracy)
        if base_lm is not None:
            base_scores.update(instruction_accuracy(base_lm, checkable, max_new_tokens)[0])
    else:
        replies = [c.text for c in lm.chat_complete([r["messages"][:-1] for r in shown[:8]], temperature=0.0)]
    tool_records = [r for r in records if r.get("calls") is not None][:MAX_TOOL_RECORDS]
    if tool_records:
        scores.update(tool_accuracy(lm, tool_records, max_new_tokens))
        if base_lm is not None:
            base_scores.update(tool_accuracy(base_lm, tool_records, max_new_tokens))
    systems = [("lmforge chat model (greedy)", scores)]
    if base_lm is not None:
        systems.append((f"base model before fine-tuning ({base})", base_scores))
    kinds = sorted(k for k in scores if k.startswith("accuracy_"))
    columns = [("assistant_loss", "held-out assistant loss"), ("accuracy", "exact match")]
    columns += [(k, k.removeprefix("accuracy_")) for k in kinds]
    columns += [(k, label) for k, label in TOOL_COLUMNS if k in scores]
    examples = [
        {"conversation": _last_turn(r["messages"]), "reference": r["messages"][-1]["content"], "output": reply}
        for r, reply in zip(shown[:8], replies[:8])
    ]
    metrics = {**scores, "examples_scored": len(checkable), "baselines": dict(systems[1:])}
    notes = [
        "Exact match: the greedy reply equals the reference answer (whitespace and a final full stop ignored), "
        "scored on the records with a checkable answer whose prompt fits the context; "
        "per-kind columns are that accuracy for one kind of instruction.",
    ]
    if training_minutes is not None:
        metrics["training_minutes"] = training_minutes
        notes.append(f"Fine-tuning took {training_minutes:.1f} minutes. Training curve: ![loss]({RunFolder.LOSS_PLOT})")
    write_task_report(
        out_dir, f"chat — {model_dir}", metrics, systems, columns, examples, describe_split(data, split, KEY_FIELD),
        notes,
    )  # fmt: skip
    return metrics


def fits_context(lm: LM, messages: list[dict], max_new_tokens: int, tools: list[dict] | None = None) -> bool:
    """Whether the conversation's prompt leaves `max_new_tokens` of the context (no turn would be dropped)."""
    try:
        lm.encode_chat_prompt(messages, max_new_tokens, tools)
    except UserError:
        return False
    return True


def linked_model(task: dict, key: str = "base") -> str | None:
    """The model folder task.json names under `key` (the base, a teacher), if it is still a model folder."""
    folder = task.get(key)
    return folder if folder and RunFolder(folder).has_model() else None


def _last_turn(messages: list[dict]) -> str:
    """The user's last message, shortened, with the turn number when there is history."""
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    text = users[-1].replace("\n", " ") if users else ""
    text = text if len(text) <= 80 else text[:80] + "…"
    return f"(turn {len(users)}) {text}" if len(users) > 1 else text


TASK = Task(
    name="chat",
    Recipe=Recipe,
    fields=FIELDS,
    family="decoder",
    objective=chat_sft_loss,
    prepare=prepare,
    evaluate_run=evaluate_run,
)
