"""Task metrics: BLEU/chrF, Chinese-aware ROUGE, classification, extractive QA, multiple-choice scoring, degeneration.

sacrebleu and rouge-score live behind this module and nowhere else. What this
module adds is what they get wrong for Chinese: rouge-score's default tokenizer
keeps only [a-z0-9] and so scores any pure-Chinese pair as zero, and SQuAD-style
QA scoring splits on whitespace, which Chinese does not have. Both are replaced
here by one segmenter (`chinese_rouge_tokens`): a CJK character per token, an
alphanumeric run per word.

Scales follow each metric's own convention: BLEU, chrF, ROUGE and QA EM/F1 are
0..100 (as sacrebleu and the CMRC 2018 script print them); classification and
multiple-choice accuracies are fractions 0..1 (as scikit-learn and
lm-evaluation-harness report them).

Knows strings, labels, token ids and a model that maps (input_ids,
attention_mask) to logits; does not know tokenizers, datasets or task prompts.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Hashable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.device import evaluating
from lmforge.errors import UserError
from lmforge.evaluate.report import pyplot, save_png


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str], what: str) -> None:
    if len(hypotheses) != len(references):
        raise UserError(f"{what}: {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise UserError(f"{what}: no examples to score")
    for index, reference in enumerate(references):
        if not reference.strip():
            raise UserError(f"{what}: reference {index} is empty")


def bleu_chrf(hypotheses: list[str], references: list[str], target_lang: str) -> dict[str, float | str]:
    """Corpus BLEU and chrF (0..100) with one reference per hypothesis, plus sacrebleu's signature strings.

    Returns {"bleu", "chrf", "bleu_signature", "chrf_signature"}. Chinese targets use sacrebleu's
    'zh' tokenizer: with '13a' an unspaced Chinese sentence is a single "word" and BLEU is ~0.
    """
    from sacrebleu.metrics import BLEU, CHRF

    _check_pairs(hypotheses, references, "BLEU/chrF")
    bleu = BLEU(tokenize="zh" if target_lang == "zh" else "13a")
    chrf = CHRF()
    return {
        "bleu": float(bleu.corpus_score(hypotheses, [references]).score),
        "chrf": float(chrf.corpus_score(hypotheses, [references]).score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def paired_bleu_chrf(
    ours: list[str], theirs: list[str], references: list[str], target_lang: str, resamples: int = 1000
) -> dict[str, dict[str, float]]:
    """sacrebleu's paired bootstrap resampling (Koehn 2004) of corpus BLEU and chrF, ours against theirs.

    Both systems are scored on the same resampled sets of examples. Returns {"bleu", "chrf"}, each {"ours",
    "theirs": the corpus scores, "ours_ci", "theirs_ci": half-widths of their 95% intervals, "p_value": how often
    the resamples do not favour the better-looking system, smaller is stronger evidence of a difference}.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    _check_pairs(ours, references, "paired BLEU/chrF")
    _check_pairs(theirs, references, "paired BLEU/chrF")
    metrics = {"bleu": BLEU(tokenize="zh" if target_lang == "zh" else "13a"), "chrf": CHRF()}
    _, results = PairedTest([("theirs", theirs), ("ours", ours)], metrics, [references], test_type="bs",
                            n_samples=resamples)()  # fmt: skip
    found = {}
    for key, (baseline, system) in zip(metrics, [results[name] for name in results if name != "System"]):
        found[key] = {"ours": float(system.score), "ours_ci": float(system.ci), "theirs": float(baseline.score),
                      "theirs_ci": float(baseline.ci), "p_value": float(system.p_value)}  # fmt: skip
    return found


def _is_cjk_ideograph(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x20000 <= code <= 0x323AF  # extensions B-H and the compatibility supplement
    )


def chinese_rouge_tokens(text: str) -> list[str]:
    """Each CJK ideograph is a token; each run of other letters/digits is one lower-cased word token.

    Punctuation, symbols and whitespace separate tokens and are dropped. Full-width forms are
    NFKC-normalised first, so "ＧＰＴ４" is "gpt4". QA scoring uses the same segmentation.
    """
    tokens: list[str] = []
    word: list[str] = []
    for char in unicodedata.normalize("NFKC", text).lower():
        if char.isalnum() and not _is_cjk_ideograph(char):
            word.append(char)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if _is_cjk_ideograph(char):
            tokens.append(char)
    if word:
        tokens.append("".join(word))
    return tokens


def text_units(text: str) -> list[str]:
    """Units for counting repetition: each CJK ideograph and each punctuation mark or symbol is one unit, each run of
    other letters/digits one word (so `１９９７年` is two units and `人、人、` four). Unlike `chinese_rouge_tokens`,
    punctuation counts: a model that loops on `“““` or `、、、` is degenerating too."""
    units, word = [], ""
    for char in text:
        if char.isalnum() and not _is_cjk_ideograph(char):
            word += char
            continue
        if word:
            units.append(word.lower())
            word = ""
        if not char.isspace():
            units.append(char)
    return units + ([word.lower()] if word else [])


def _ngrams(units: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the texts (distinct-n, Li et al. 2016, https://arxiv.org/abs/1510.03055):
    1.0 when no n-gram recurs, near 0 for a model that says the same thing over and over. 0.0 with no n-grams."""
    grams = [gram for text in texts for gram in _ngrams(text_units(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(texts: Sequence[str], n: int = 4) -> float:
    """The share of n-grams that repeat an earlier n-gram of the same text (rep-n, Welleck et al. 2019,
    https://arxiv.org/abs/1908.04319), over all texts: 0 for no loops, near 1 for `人、人、人、…`.
    0.0 with no n-grams."""
    total = repeated = 0
    for text in texts:
        grams = _ngrams(text_units(text), n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def degeneration(texts: Sequence[str]) -> dict[str, float]:
    """{"distinct_2", "repeated_4grams"} of generated texts: how varied they are and how much they loop."""
    return {"distinct_2": distinct_n(texts, 2), "repeated_4grams": repeated_ngram_share(texts, 4)}


def chrf(hypothesis: str, reference: str) -> float:
    """sacrebleu's sentence chrF (0..1) of one pair: translation's utility for MBR decoding."""
    return _chrf().sentence_score(hypothesis, [reference]).score / 100


@functools.cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


@functools.cache
def _rouge_scorer(*kinds: str):
    from rouge_score.rouge_scorer import RougeScorer

    # rouge-score only calls .tokenize(text); a duck-typed object avoids subclassing its Tokenizer.
    return RougeScorer(list(kinds), tokenizer=SimpleNamespace(tokenize=chinese_rouge_tokens))


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0..1) of one pair, on `chinese_rouge_tokens`: summarization's utility for MBR decoding."""
    return _rouge_scorer("rougeL").score(reference, hypothesis)["rougeL"].fmeasure


def rouge_per_example(hypotheses: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 (0..100) of each pair, on `chinese_rouge_tokens`. Keys: rouge1, rouge2, rougeL."""
    _check_pairs(hypotheses, references, "ROUGE")
    scorer = _rouge_scorer("rouge1", "rouge2", "rougeL")
    values: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # NOTE: rouge-score takes (target, prediction)
        for name, column in values.items():
            column.append(100 * scores[name].fmeasure)
    return values


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (0..100) averaged over examples, on `chinese_rouge_tokens`. Keys: rouge1, rouge2, rougeL."""
    return means(rouge_per_example(hypotheses, references))


def means(columns: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over its per-example values."""
    return {name: sum(column) / len(column) for name, column in columns.items()}


def paired_difference(
    ours: Sequence[float], theirs: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean per-example difference ours - theirs, with a percentile bootstrap interval over examples.

    Both systems are scored on the same examples, so resampling the differences (not each system alone) keeps
    what is shared between them out of the interval. Returns {"mean", "low", "high"}.
    """
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired scores need equal, non-zero lengths, not {len(ours)} and {len(theirs)}")
    differences = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    return bootstrap_mean(differences, confidence, resamples, seed)


def bootstrap_mean(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """The mean of per-example values with a percentile bootstrap interval over examples: {"mean", "low", "high"}."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    if np.all(values == values[0]):  # no spread: the interval is the point (scipy would warn, then NaN)
        return {"mean": float(values[0]), "low": float(values[0]), "high": float(values[0])}
    interval = bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return {"mean": float(values.mean()), "low": float(interval.low), "high": float(interval.high)}


def edit_similarity(hypothesis: str, reference: str) -> float:
    """100 * (1 - indel distance / (len(h) + len(r))) = 200 * LCS / (len(h) + len(r)), 100 for two empty strings.

    The Levenshtein ratio with a substitution counted as a deletion plus an insertion, which `fuzzywuzzy.fuzz.ratio`
    computes and the CodeXGLUE line-completion scorer reports as edit similarity (there rounded to an integer).
    """
    total = len(hypothesis) + len(reference)
    if total == 0:
        return 100.0
    previous = [0] * (len(reference) + 1)  # LCS lengths of the hypothesis so far against each reference prefix
    for char in hypothesis:
        current = [0]
        for column, other in enumerate(reference, start=1):
            current.append(previous[column - 1] + 1 if char == other else max(previous[column], current[-1]))
        previous = current
    return 200.0 * previous[-1] / total


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one problem from `samples` samples of which `correct` pass (Chen et al. 2021,
    https://arxiv.org/abs/2107.03374): 1 - C(n - c, k) / C(n, k), as a product so large n does not overflow."""
    if k > samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, not {samples}")
    if samples - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def _label_order(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> list[Hashable]:
    present = set(labels) | set(predictions)
    try:
        return sorted(present)
    except TypeError:  # mixed label types (say 1 and "1") have no natural order
        return sorted(present, key=repr)


def classification_metrics(
    predictions: Sequence[Hashable], labels: Sequence[Hashable], label_names: Sequence[Hashable] | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix, all fractions 0..1.

    Returns {"accuracy", "macro_f1", "per_class": [{"label", "precision", "recall", "f1", "support"}, ...],
    "confusion_matrix": rows = true label, columns = predicted, "labels": the row/column order}. The order
    is `label_names`, or the sorted union of labels and predictions. Macro-F1 leaves out classes with
    neither true nor predicted examples (they have no F1 to speak of); a class with zero precision and
    recall counts as F1 0.
    """
    if len(predictions) != len(labels):
        raise UserError(f"classification: {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise UserError("classification: no examples to score")
    order = list(label_names) if label_names is not None else _label_order(predictions, labels)
    position = {label: index for index, label in enumerate(order)}
    if len(position) != len(order):
        raise UserError("classification: label_names holds a label twice")
    unknown = [value for value in (*labels, *predictions) if value not in position]
    if unknown:
        raise UserError(f"classification: label {unknown[0]!r} is not in label_names {order}")

    matrix = [[0] * len(order) for _ in order]
    for predicted, true in zip(predictions, labels):
        matrix[position[true]][position[predicted]] += 1
    per_class, f1_scores = [], []
    for index, label in enumerate(order):
        correct = matrix[index][index]
        support = sum(matrix[index])
        predicted_count = sum(row[index] for row in matrix)
        precision = correct / predicted_count if predicted_count else 0.0
        recall = correct / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support})
        if support or predicted_count:
            f1_scores.append(f1)
    return {
        "accuracy": sum(matrix[index][index] for index in range(len(order))) / len(labels),
        "macro_f1": sum(f1_scores) / len(f1_scores),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "labels": order,
    }


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], label_names: Sequence[Any], path: str | Path, title: str = "confusion matrix"
) -> None:
    """The confusion matrix (rows true, columns predicted) as an annotated heat map with a colour bar, as a PNG."""
    plt = pyplot()
    size = max(4.0, 0.6 * len(label_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size), dpi=110)
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    names = [str(name) for name in label_names]
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    largest = max((max(row) for row in matrix), default=0)
    for row_index, row in enumerate(matrix):
        for column_index, count in enumerate(row):
            # white text on dark cells, so counts stay readable at both ends of the colour map
            colour = "white" if count > largest / 2 else "black"
            axes.text(column_index, row_index, str(count), ha="center", va="center", color=colour)
    figure.tight_layout()
    save_png(figure, path)


def _longest_common_substring(first: Sequence[str], second: Sequence[str]) -> int:
    best = 0
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0] * (len(second) + 1)
        for index, other in enumerate(second, start=1):
            if item == other:
                current[index] = previous[index - 1] + 1
                best = max(best, current[index])
        previous = current
    return best


def qa_exact_match_f1(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Extractive-QA exact match and F1 (0..100), each prediction against its best reference, as CMRC 2018 scores.

    Text is segmented by `chinese_rouge_tokens` (lower-cased; punctuation and whitespace removed; a Chinese
    character or an English word per unit). EM compares the joined units. Returns {"exact_match", "f1"}.
    NOTE: F1 follows the CMRC 2018 evaluation script (https://github.com/ymcui/cmrc2018), which counts the
    longest common *contiguous* run of units, not SQuAD's bag-of-tokens overlap: "大学北京" against
    "北京大学" scores 50, not 100.
    """
    if len(predictions) != len(references):
        raise UserError(f"QA: {len(predictions)} predictions but {len(references)} reference lists")
    if not references:
        raise UserError("QA: no examples to score")
    for index, answers in enumerate(references):
        if not answers or not all(answer.strip() for answer in answers):
            raise UserError(f"QA: reference list {index} is empty or holds an empty answer")

    exact_total, f1_total = 0.0, 0.0
    for prediction, answers in zip(predictions, references):
        predicted = chinese_rouge_tokens(prediction)
        exact, f1 = 0.0, 0.0
        for answer in answers:
            expected = chinese_rouge_tokens(answer)
            if "".join(predicted) == "".join(expected):
                exact = 1.0
            common = _longest_common_substring(expected, predicted)
            if common:
                precision, recall = common / len(predicted), common / len(expected)
                f1 = max(f1, 2 * precision * recall / (precision + recall))
        exact_total += exact
        f1_total += f1
    return {"exact_match": 100 * exact_total / len(predictions), "f1": 100 * f1_total / len(predictions)}


def choice_logprobs(model: nn.Module, context_ids: list[int], choices: list[list[int]]) -> list[float]:
    """Sum of log P(choice tokens | context) for each choice, all choices in one right-padded batch.

    The lm-evaluation-harness way of scoring multiple choice with a decoder LM; the highest sum wins.
    `model(input_ids, attention_mask)` must return logits (B, T, vocab). Takes token ids, not text, so
    no tokenizer is needed: tokenize the context and each choice (with its leading space, if the
    tokenizer has one) at the edge. The caller keeps context + choice within the model's context length.
    """
    if not context_ids:
        raise UserError("choice_logprobs: context_ids is empty; start it with at least one token (a BOS token)")
    if not choices:
        raise UserError("choice_logprobs: no choices to score")
    for index, choice in enumerate(choices):
        if not choice:
            raise UserError(f"choice_logprobs: choice {index} has no tokens")

    device = next(model.parameters()).device
    # The last token predicts nothing we score, so each row is context + choice minus its final token.
    rows = [context_ids + choice[:-1] for choice in choices]
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)  # pad id is arbitrary: padding is masked
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.zeros(len(rows), length, dtype=torch.long)
    scored = torch.zeros(len(rows), length, dtype=torch.bool)
    start = len(context_ids) - 1  # the position whose logits predict the first choice token
    for index, (row, choice) in enumerate(zip(rows, choices)):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
        targets[index, start : start + len(choice)] = torch.tensor(choice)
        scored[index, start : start + len(choice)] = True

    with evaluating(model):
        logits = model(input_ids.to(device), attention_mask.to(device))  # (B, T, vocab)
    # Only positions from `start` on are scored; skip the log-softmax over the context.
    log_probs = F.log_softmax(logits[:, start:].float(), dim=-1)  # (B, T - start, vocab)
    token_log_probs = log_probs.gather(-1, targets[:, start:, None].to(device)).squeeze(-1)  # (B, T - start)
    sums = (token_log_probs * scored[:, start:].to(device)).sum(-1)  # (B,)
    return sums.tolist()


def mcq_accuracy(correct: list[bool], num_choices: int = 4) -> dict[str, float]:
    """Accuracy, chance (1 / num_choices) and chance-centred accuracy (acc - chance) / (1 - chance), as fractions.

    Chance-centred accuracy is 0 for random guessing and 1 for a perfect score, so benchmarks with
    different numbers of choices can be compared. Keys: accuracy, chance, centred_accuracy.
    """
    if not correct:
        raise UserError("multiple choice: no examples to score")
    if num_choices < 2:
        raise UserError(f"multiple choice: num_choices must be at least 2, not {num_choices}")
    accuracy = sum(bool(value) for value in correct) / len(correct)
    chance = 1 / num_choices
    return {"accuracy": accuracy, "chance": chance, "centred_accuracy": (accuracy - chance) / (1 - chance)}
