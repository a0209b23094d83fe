"""Minimum Bayes risk (MBR) decoding: of a model's samples, output the one the others agree with most.

The most likely output (what beam search looks for) is often not the best one
by the metric the task is judged on. MBR instead treats the model's own samples
as stand-ins for the unknown reference and picks the candidate with the highest
expected utility against them (Kumar and Byrne 2004,
https://aclanthology.org/N04-1022/; Freitag et al. 2022, "High Quality Rather
than High Model Probability", https://arxiv.org/abs/2111.09388). With ROUGE-L
as the utility this is the consensus headline: the one sharing the most with
all the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import TypeVar

Candidate = TypeVar("Candidate", bound=Hashable)  # a text, or a tuple of token ids
Utility = Callable[[Candidate, Candidate], float]  # (hypothesis, pseudo-reference) -> how good, higher is better


def minimum_bayes_risk(candidates: list[Candidate], utility: Utility) -> Candidate:
    """The candidate whose summed utility against all candidates (itself included) is highest.

    Candidates are both the hypotheses and the evidence: a text sampled k times counts k times as evidence,
    but each distinct text is scored once. Ties go to the candidate seen first.
    """
    if not candidates:
        raise ValueError("minimum Bayes risk needs at least one candidate")
    counts = Counter(candidates)  # insertion-ordered: the first-seen candidate wins a tie
    distinct = list(counts)
    expected = [
        sum(count * utility(hypothesis, evidence) for evidence, count in counts.items()) for hypothesis in distinct
    ]
    return distinct[max(range(len(distinct)), key=expected.__getitem__)]
