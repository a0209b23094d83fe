"""Minimum Bayes risk selection: the consensus candidate wins, repeated samples count as evidence, ties go first."""

import pytest

from lmforge.evaluate.metrics import rouge_l
from lmforge.generate.mbr import Symmetric, minimum_bayes_risk


def test_the_candidate_sharing_most_with_the_others_wins():
    # ROUGE-L F1 by hand: 今天北京下雨 (6 tokens) vs 北京下雨 (4): LCS 4, F = 8/10; vs 今天上海晴 (5): LCS 2, F = 4/11;
    # 北京下雨 vs 今天上海晴: 0. Summed with itself (1): 2.16, 1.80 and 1.36, so the first one is the consensus.
    assert rouge_l("今天北京下雨", "北京下雨") == pytest.approx(0.8)
    assert rouge_l("今天北京下雨", "今天上海晴") == pytest.approx(4 / 11)
    assert minimum_bayes_risk(["北京下雨", "今天上海晴", "今天北京下雨"], rouge_l) == "今天北京下雨"


def test_a_text_sampled_twice_counts_twice_as_evidence_but_is_scored_once():
    calls = []

    def utility(hypothesis: str, evidence: str) -> float:
        calls.append((hypothesis, evidence))
        return rouge_l(hypothesis, evidence)

    # 北京下雨 alone: 1 + 0 + 0; 今天上海晴, sampled twice: 0 + 2 * 1.
    assert minimum_bayes_risk(["北京下雨", "今天上海晴", "今天上海晴"], utility) == "今天上海晴"
    assert len(calls) == 4  # 2 distinct hypotheses x 2 distinct pieces of evidence


def test_exact_match_utility_picks_the_most_frequent_and_ties_go_to_the_first_seen():
    same = lambda hypothesis, evidence: float(hypothesis == evidence)  # noqa: E731
    assert minimum_bayes_risk(["b", "a", "c", "a"], same) == "a"
    assert minimum_bayes_risk(["b", "a", "c"], same) == "b"
    assert minimum_bayes_risk(["only"], same) == "only"
    with pytest.raises(ValueError, match="at least one candidate"):
        minimum_bayes_risk([], same)


def test_a_symmetric_utility_is_called_once_per_pair_and_chooses_as_the_full_table_does():
    candidates = ["今天北京下雨", "北京下雨", "今天上海晴", "北京今天下大雨", "上海晴", "北京下雨"]
    calls = []

    def utility(hypothesis: str, evidence: str) -> float:
        calls.append((hypothesis, evidence))
        return rouge_l(hypothesis, evidence)

    full = minimum_bayes_risk(candidates, utility)
    assert len(calls) == 5 * 5  # distinct candidates, every ordered pair
    calls.clear()
    assert minimum_bayes_risk(candidates, Symmetric(utility)) == full == "今天北京下雨"
    assert len(calls) == 5 * 6 // 2  # each unordered pair once, each candidate with itself once
    assert rouge_l("北京下雨", "今天北京下雨") == rouge_l("今天北京下雨", "北京下雨")  # why ROUGE-L F1 may be wrapped
