"""Minimum Bayes risk (MBR) decoding: of a model's samples, output the one the others agree with most.

The most likely output (what beam search looks for) is often not the best one
by the metric the task is judged on. MBR instead treats the model's own samples
as stand-ins for the unknown reference and picks the candidate with the highest
expected utility against them (Kumar and Byrne 2004,
https://aclanthology.org/N04-1022/; Freitag et al. 2022, "High Quality Rather
than High Model Probability", https://arxiv.org/abs/2111.09388). With ROUGE-L
as the utility this is the consensus headline: the one sharing the most with
all the others. A utility wrapped in `Symmetric` (u(a, b) = u(b, a), as ROUGE-L
F1 is) is called once per pair of distinct candidates instead of twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Candidate = TypeVar("Candidate", bound=Hashable)  # a text, or a tuple of token ids
Utility = Callable[[Candidate, Candidate], float]  # (hypothesis, pseudo-reference) -> how good, higher is better


@dataclass(frozen=True)
class Symmetric(Generic[Candidate]):
    """A utility the caller vouches is symmetric, u(a, b) == u(b, a); it is called as the utility it wraps."""

    utility: Utility

    def __call__(self, hypothesis: Candidate, evidence: Candidate) -> float:
        return self.utility(hypothesis, evidence)


def _utility_table(distinct: list[Candidate], utility: Utility) -> list[list[float]]:
    """table[i][j] = utility(distinct[i], distinct[j]); for a `Symmetric` one the lower half mirrors the upper."""
    size = len(distinct)
    if not isinstance(utility, Symmetric):
        return [[utility(hypothesis, evidence) for evidence in distinct] for hypothesis in distinct]
    table = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i, size):
            table[i][j] = table[j][i] = utility(distinct[i], distinct[j])
    return table


def minimum_bayes_risk(candidates: list[Candidate], utility: Utility) -> Candidate:
    """The candidate whose summed utility against all candidates (itself included) is highest.

    Candidates are both the hypotheses and the evidence: a text sampled k times counts k times as evidence,
    but each distinct pair is scored once (each unordered pair once, for a `Symmetric` utility). Ties go to the
    candidate seen first.
    """
    if not candidates:
        raise ValueError("minimum Bayes risk needs at least one candidate")
    counts = Counter(candidates)  # insertion-ordered: the first-seen candidate wins a tie
    distinct = list(counts)
    table = _utility_table(distinct, utility)
    weights = list(counts.values())
    expected = [sum(weight * value for weight, value in zip(weights, row)) for row in table]
    return distinct[max(range(len(distinct)), key=expected.__getitem__)]
