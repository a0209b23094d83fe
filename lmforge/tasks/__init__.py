"""Applications as tasks: each is a data format, an input layout, a model family, an objective and its metrics.

`TASKS` maps a task name to its module. A trainable task's module holds a
`TASK` (`tasks.base.Task`) that `run_task` trains, saves and evaluates; every
module has a `Recipe` dataclass and `evaluate_run(model_dir, data, split,
out_dir, progress)` (mcq is evaluation-only). Causal-LM pretraining
(`causal_lm.py`) is a task too, run by `lmforge pretrain`. Modules are imported
on use, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lmforge.errors import UserError

TASKS = {
    "mlm": "masked-LM pretraining of an encoder on plain text",
    "sentiment": "text classification with an encoder ({text, label})",
    "translate": "zh->en or en->zh translation with an encoder-decoder ({src, tgt})",
    "span": "span-corruption pretraining of an encoder-decoder on plain text (T5); --base of translate, summarize",
    "summarize": "summarization with an encoder-decoder ({document, summary})",
    "qa": "extractive question answering with an encoder ({context, question, answers})",
    "chat": "chat fine-tuning of a decoder on conversations ({messages}); --lora-rank for LoRA",
    "dpo": "preference tuning of a chat model with DPO ({messages, chosen, rejected})",
    "grpo": "reinforcement learning of a chat model from verifiable rewards ({messages, answer}; builtin:tools)",
    "distill": "a smaller decoder trained on a teacher's logits (--teacher RUN) and plain text",
    "write": "poems and news with form and style controls, from a pretrained decoder ({title, text}); --base",
    "code": "code completion on Python files (stdlib or a folder), left to right and fill-in-the-middle",
    "mcq": "multiple choice scored by a decoder's log-likelihood ({question, choices, answer}); evaluation only",
}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"lmforge.tasks.{name}")
