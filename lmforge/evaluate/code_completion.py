"""Scoring code completion: next-line and fill-in-the-middle examples from held-out files, their baselines, and
HumanEval-style functional correctness (pass@k).

Next line follows the CodeXGLUE line-completion protocol (https://arxiv.org/abs/2102.04664): given a file up to a
line, predict that line; exact match and edit similarity compare the stripped lines, so (as there, where INDENT
tokens are dropped) indentation is not scored. The prompt ends at the line's start, not after its indentation: the
tokenizer joins a word to the space before it (`"   ", " print"`), so a prompt ending in the whole indentation
(`"    "`) ends on a token the model never saw before a word, and it then mostly writes nothing or a wrong line
(exact match 1.5% against 10% on the same 200 lines). Fill-in-the-middle hides one line between its prefix and
suffix, cut the same way. Whether a completion parses is checked on the whole file with the completion in
place, for files that parsed before.

Knows source text, an `LM`, and the sandbox of `execution.py`; does not know training.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.code import CodeFile, fim_prompt_ids, parses
from lmforge.errors import UserError
from lmforge.evaluate.execution import Limits, Outcome, run_programs
from lmforge.evaluate.metrics import edit_similarity, pass_at_k
from lmforge.lm import LM

LAST_TOKEN = re.compile(r"\w+|[^\w\s]")
# Where a HumanEval completion ends: the next top-level statement (the Codex paper's stop sequences).
HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass
class LineExample:
    file: CodeFile
    line: int  # index into the file's lines
    before: str  # the file up to the line's start
    indent: str  # the line's indentation
    after: str  # the rest of the file after the line (from its newline on)
    target: str  # the line, stripped
    previous: str  # the last non-blank line before it, stripped

    def with_line(self, completion: str) -> str:
        """The whole file with `completion`, stripped and at the line's indentation, in place of the line."""
        return self.before + self.indent + completion.strip() + self.after


def line_examples(files: Sequence[CodeFile], count: int, seed: int = 0) -> list[LineExample]:
    """`count` non-blank lines (not a file's first) drawn at random, with a seed, from all lines of `files`."""
    positions = [(f, i) for f, file in enumerate(files) for i, line in enumerate(_lines(file)) if i and line.strip()]
    if not positions:
        raise UserError("the held-out code files have no line to complete")
    picked = np.random.default_rng(seed).permutation(len(positions))[:count]
    examples = []
    for index in sorted(picked):
        f, i = positions[index]
        lines = _lines(files[f])
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        previous = next((text.strip() for text in reversed(lines[:i]) if text.strip()), "")
        before, after = "".join(lines[:i]), line[len(line.rstrip("\r\n")) :] + "".join(lines[i + 1 :])
        examples.append(LineExample(files[f], i, before, indent, after, line.strip(), previous))
    return examples


def _lines(file: CodeFile) -> list[str]:
    return file.text.splitlines(keepends=True)


def last_token(line: str) -> str:
    tokens = LAST_TOKEN.findall(line)
    return tokens[-1] if tokens else ""


def frequent_next_lines(files: Sequence[CodeFile]) -> tuple[dict[str, str], str]:
    """({last token of a line: the most frequent next non-blank line after it}, the most frequent line overall)."""
    following: dict[str, Counter] = {}
    overall: Counter = Counter()
    for file in files:
        lines = [line.strip() for line in file.text.splitlines() if line.strip()]
        for previous, line in zip(lines, lines[1:]):
            following.setdefault(last_token(previous), Counter())[line] += 1
            overall[line] += 1
    table = {token: counter.most_common(1)[0][0] for token, counter in following.items()}
    return table, overall.most_common(1)[0][0] if overall else ""


def baseline_lines(examples: Sequence[LineExample], training_files: Sequence[CodeFile]) -> dict[str, list[str]]:
    """Each baseline's prediction per example: the previous line repeated, and the most frequent next line (on the
    training files) for the previous line's last token."""
    table, fallback = frequent_next_lines(training_files)
    return {
        "previous line": [example.previous for example in examples],
        "most frequent next line": [table.get(last_token(example.previous), fallback) for example in examples],
    }


def fit_prompt(lm: LM, text: str, budget: int, keep: str = "end") -> str:
    """`text` cut to at most `budget` tokens, from the start (keep="end") or from the end (keep="start"), at a line
    boundary where one is near."""
    ids = lm.tokenizer.encode(text)
    if len(ids) <= budget:
        return text
    if keep == "end":
        cut = lm.tokenizer.decode(ids[len(ids) - budget :])
        return cut[cut.find("\n") + 1 :] if "\n" in cut else cut
    cut = lm.tokenizer.decode(ids[:budget])
    return cut[: cut.rfind("\n")] if "\n" in cut else cut


def complete_lines(lm: LM, examples: Sequence[LineExample], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """The model's greedy next line for each example (its text up to the first newline)."""
    budget = lm.model.config.max_position_embeddings - max_new_tokens - 1
    prompts = [fit_prompt(lm, example.before, budget) for example in examples]
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        completions = lm.complete(batch, stop="\n", temperature=0.0, repetition_penalty=1.0,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
        outputs += [completion.text for completion in completions]
    return outputs


def complete_middles(lm: LM, examples: Sequence[LineExample], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """The model's greedy fill-in-the-middle for each example's line, given the file before and after it."""
    half = (lm.model.config.max_position_embeddings - max_new_tokens - 5) // 2
    prompt_ids = [
        fim_prompt_ids(lm.tokenizer, fit_prompt(lm, e.before, half), fit_prompt(lm, e.after, half, keep="start"))
        for e in examples
    ]
    outputs = []
    for start in range(0, len(prompt_ids), batch_size):
        completions = lm.complete_ids(prompt_ids[start : start + batch_size], stop="\n", temperature=0.0,
                                      repetition_penalty=1.0, max_new_tokens=max_new_tokens)  # fmt: skip
        outputs += [completion.text for completion in completions]
    return outputs


def score_lines(examples: Sequence[LineExample], predictions: Sequence[str]) -> dict[str, list[float]]:
    """Per example: exact_match (0/1), edit_similarity (0..100) of the stripped lines, and parses (0/1, only for
    examples whose file parsed before: NaN otherwise)."""
    scores: dict[str, list[float]] = {"exact_match": [], "edit_similarity": [], "parses": []}
    for example, prediction in zip(examples, predictions):
        predicted = prediction.strip()
        scores["exact_match"].append(float(predicted == example.target))
        scores["edit_similarity"].append(edit_similarity(predicted, example.target))
        parsed = parses(example.with_line(prediction)) if example.file.parses else float("nan")
        scores["parses"].append(float(parsed))
    return scores


def read_problems(path: str | Path) -> list[dict]:
    """HumanEval rows ({task_id, prompt, test, entry_point, canonical_solution}) from a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no HumanEval file at {path}")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"line {number} of {path} is not JSON: {error.msg}") from None
        missing = [name for name in HUMANEVAL_FIELDS if not isinstance(row.get(name), str)]
        if missing:
            raise UserError(f"line {number} of {path} lacks the HumanEval fields {missing}")
        problems.append(row)
    if not problems:
        raise UserError(f"{path} holds no problems")
    return problems


def program(problem: dict, completion: str) -> str:
    """The prompt, the completion, the problem's tests and the call that runs them (HumanEval's check program)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check_completions(
    problems: Sequence[dict], completions: Sequence[Sequence[str]], limits: Limits
) -> list[list[Outcome]]:
    """Run every completion of every problem in the sandbox; the outcomes per problem."""
    programs = [program(problem, text) for problem, texts in zip(problems, completions) for text in texts]
    outcomes = iter(run_programs(programs, limits))
    return [[next(outcomes) for _ in texts] for texts in completions]


def pass_at_ks(outcomes: Sequence[Sequence[Outcome]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean unbiased pass@k over problems, for each k no larger than the samples per problem."""
    samples = min(len(problem) for problem in outcomes)
    passed = [sum(outcome.passed for outcome in problem) for problem in outcomes]
    return {
        f"pass@{k}": float(np.mean([pass_at_k(len(problem), c, k) for problem, c in zip(outcomes, passed)]))
        for k in ks
        if k <= samples
    }


def sample_completions(lm: LM, problems: Sequence[dict], samples: int, temperature: float, max_new_tokens: int,
                       seed: int = 0) -> tuple[list[list[str]], int]:  # fmt: skip
    """`samples` completions per problem (greedy when temperature is 0), and how many prompts had to be cut from
    the start to fit the model's context."""
    budget = lm.model.config.max_position_embeddings - max_new_tokens - 1
    completions, cut = [], 0
    for number, problem in enumerate(problems):
        prompt = fit_prompt(lm, problem["prompt"], budget)
        cut += prompt != problem["prompt"]
        texts = lm.generate([prompt] * samples, stop=HUMANEVAL_STOP, temperature=temperature, top_p=0.95, top_k=0,
                            repetition_penalty=1.0, max_new_tokens=max_new_tokens, seed=seed + number)  # fmt: skip
        completions.append(texts)
    return completions, cut
