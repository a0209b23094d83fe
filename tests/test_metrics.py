"""Metrics against sacrebleu on known inputs, hand-computed ROUGE/QA/classification numbers, and a padded batch
of choices against each choice scored alone."""

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score.rouge_scorer import RougeScorer

from lmforge.errors import UserError
from lmforge.evaluate.metrics import (
    bleu_chrf,
    chinese_rouge_tokens,
    choice_logprobs,
    chrf,
    classification_metrics,
    degeneration,
    distinct_n,
    mcq_accuracy,
    paired_difference,
    plot_confusion_matrix,
    qa_exact_match_f1,
    repeated_ngram_share,
    rouge,
    rouge_l,
    rouge_per_example,
    text_units,
)
from lmforge.models.decoder import Decoder, DecoderConfig

CHINESE_HYPOTHESES = ["今天天气很好，我们去公园散步吧。", "他在北京大学学习计算机科学。", "这本书非常有意思。"]
CHINESE_REFERENCES = ["今天天气不错，我们去公园走走吧。", "他在北京大学读计算机科学。", "这本书很有意思。"]
ENGLISH_HYPOTHESES = ["The cat sat on the mat.", "It is raining heavily today.", "She reads a book every week."]
ENGLISH_REFERENCES = ["The cat is sitting on the mat.", "It rains heavily today.", "She reads one book each week."]


@pytest.mark.parametrize(
    "hypotheses, references, target_lang, tokenize",
    [
        (CHINESE_HYPOTHESES, CHINESE_REFERENCES, "zh", "zh"),
        (ENGLISH_HYPOTHESES, ENGLISH_REFERENCES, "en", "13a"),
    ],
)
def test_bleu_chrf_match_sacrebleu(hypotheses, references, target_lang, tokenize):
    scores = bleu_chrf(hypotheses, references, target_lang)
    expected_bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    expected_chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    assert scores["bleu"] == pytest.approx(expected_bleu.score, abs=1e-9)
    assert scores["chrf"] == pytest.approx(expected_chrf.score, abs=1e-9)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert f"tok:{tokenize}" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1")


def test_bleu_chinese_tokenizer_matters():
    # With 13a an unspaced Chinese sentence is one "word": no n-gram matches unless the sentences are identical.
    hypotheses, references = ["今天天气很好"], ["今天天气不错"]
    assert sacrebleu.corpus_bleu(hypotheses, [references], tokenize="13a").score == 0.0
    assert bleu_chrf(hypotheses, references, "zh")["bleu"] > 20
    assert bleu_chrf(hypotheses, references, "en")["bleu"] == 0.0


def test_chinese_rouge_tokens():
    assert chinese_rouge_tokens("我爱Python编程！") == ["我", "爱", "python", "编", "程"]
    expected = ["gpt4", "模", "型", "2024", "年", "hello", "world"]
    assert chinese_rouge_tokens("ＧＰＴ４模型, 2024年  Hello-World") == expected  # full-width forms normalised
    assert chinese_rouge_tokens("㐀𠀀") == ["㐀", "𠀀"]  # extension A and B ideographs
    assert chinese_rouge_tokens("，。！？ ...") == []


def test_rouge_default_tokenizer_drops_chinese():
    default = RougeScorer(["rouge1"])
    assert default._tokenizer.tokenize("今天天气很好") == []
    assert default.score("今天天气很好", "今天天气很好")["rouge1"].fmeasure == 0.0
    perfect = {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert rouge(["今天天气很好"], ["今天天气很好"]) == pytest.approx(perfect)


def test_rouge_hand_computed_chinese():
    # 今天天气很好 vs 今天天气不错: unigrams 今, 天×2, 气 overlap → 4/6 each way;
    # bigrams 今天, 天天, 天气 → 3/5; longest common subsequence 今天天气 → 4/6.
    scores = rouge(["今天天气很好"], ["今天天气不错"])
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3, abs=1e-6)
    assert scores["rouge2"] == pytest.approx(60.0, abs=1e-6)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3, abs=1e-6)

    # Same characters reordered: all unigrams match, bigrams 天气, 今天, 很好 → 3/5, longest subsequence 今天很好 → 4/6.
    scores = rouge(["天气今天很好"], ["今天天气很好"])
    assert scores["rouge1"] == pytest.approx(100.0, abs=1e-6)
    assert scores["rouge2"] == pytest.approx(60.0, abs=1e-6)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3, abs=1e-6)


def test_rouge_mixed_chinese_english_and_averaging():
    # [我, 爱, python, 编, 程] vs [我, 爱, python, 和, 编, 程]: P = 5/5, R = 5/6, F = 10/11. Bigrams: 3 of 4 vs 5.
    # rougeL: LCS 5 → same as rouge1.
    mixed = rouge(["我爱Python编程"], ["我爱 python 和编程"])
    assert mixed["rouge1"] == pytest.approx(100 * 10 / 11, abs=1e-6)
    precision, recall = 3 / 4, 3 / 5
    assert mixed["rouge2"] == pytest.approx(100 * 2 * precision * recall / (precision + recall), abs=1e-6)
    assert mixed["rougeL"] == pytest.approx(100 * 10 / 11, abs=1e-6)
    both = rouge(["我爱Python编程", "今天天气很好"], ["我爱 python 和编程", "今天天气不错"])
    assert both["rouge1"] == pytest.approx((100 * 10 / 11 + 100 * 2 / 3) / 2, abs=1e-6)
    per_example = rouge_per_example(["我爱Python编程", "今天天气很好"], ["我爱 python 和编程", "今天天气不错"])
    assert per_example["rouge1"] == pytest.approx([100 * 10 / 11, 100 * 2 / 3], abs=1e-6)
    # One pair's ROUGE-L as a fraction, MBR decoding's utility.
    assert rouge_l("我爱Python编程", "我爱 python 和编程") == pytest.approx(10 / 11, abs=1e-9)


def test_sentence_chrf_is_sacrebleus_as_a_fraction():
    for hypothesis, reference in zip(ENGLISH_HYPOTHESES + CHINESE_HYPOTHESES, ENGLISH_REFERENCES + CHINESE_REFERENCES):
        expected = sacrebleu.sentence_chrf(hypothesis, [reference]).score / 100
        assert chrf(hypothesis, reference) == pytest.approx(expected, abs=1e-12)
        assert 0 < chrf(hypothesis, reference) < 1
    assert chrf("完全相同", "完全相同") == pytest.approx(1.0)


def test_paired_difference_interval_covers_the_true_gain_and_narrows_with_examples():
    rng = np.random.default_rng(1)
    # System A beats B by 0.5 per example on average, with per-example noise sd 1 on the difference.
    shared = rng.normal(20, 10, 2000)  # what both systems share (hard and easy examples) cancels when paired
    ours, theirs = shared + 0.5 + rng.normal(0, 1, 2000), shared
    many = paired_difference(ours.tolist(), theirs.tolist())
    assert many["mean"] == pytest.approx(float(np.mean(ours - theirs)))
    assert many["low"] < 0.5 < many["high"] and many["low"] > 0  # the gain is found, and 0 is excluded
    assert many["high"] - many["low"] == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)  # sd / sqrt(n)
    few = paired_difference(ours[:40].tolist(), theirs[:40].tolist())
    width_ratio = (few["high"] - few["low"]) / (many["high"] - many["low"])
    assert width_ratio == pytest.approx(np.sqrt(2000 / 40), rel=0.3)  # 50x fewer examples: ~7x wider
    assert paired_difference([3.0, 4.0], [1.0, 2.0]) == {"mean": 2.0, "low": 2.0, "high": 2.0}
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0], [1.0, 2.0])


def test_classification_metrics_hand_computed():
    labels = ["a", "a", "b", "b", "c", "c"]
    predictions = ["a", "b", "b", "b", "a", "c"]
    result = classification_metrics(predictions, labels)
    assert result["labels"] == ["a", "b", "c"]
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    # a: P 1/2 R 1/2 F 1/2; b: P 2/3 R 1 F 4/5; c: P 1 R 1/2 F 2/3
    per_class = {row["label"]: row for row in result["per_class"]}
    assert per_class["b"]["precision"] == pytest.approx(2 / 3)
    assert per_class["b"]["recall"] == pytest.approx(1.0)
    assert per_class["c"]["f1"] == pytest.approx(2 / 3)
    assert per_class["c"]["support"] == 2
    assert result["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_classification_metrics_label_names_and_empty_classes():
    # "体育" is never predicted correctly (F1 0, counted); "科技" has no examples at all (left out of macro-F1).
    labels = ["财经", "财经", "体育", "娱乐"]
    predictions = ["财经", "体育", "财经", "娱乐"]
    result = classification_metrics(predictions, labels, label_names=["体育", "财经", "娱乐", "科技"])
    assert result["labels"] == ["体育", "财经", "娱乐", "科技"]
    assert result["confusion_matrix"] == [[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    per_class = {row["label"]: row for row in result["per_class"]}
    assert per_class["体育"]["f1"] == 0.0
    assert per_class["科技"] == {"label": "科技", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx((0 + 1 / 2 + 1) / 3)
    assert classification_metrics([2, 10, 1], [10, 2, 1])["labels"] == [1, 2, 10]  # numeric order, not text order


def test_plot_confusion_matrix_writes_png(tmp_path):
    path = tmp_path / "plots" / "confusion.png"
    plot_confusion_matrix([[5, 1], [2, 7]], ["negative", "positive"], path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [entry.name for entry in path.parent.iterdir()] == ["confusion.png"]  # no temp file left behind


def test_qa_exact_match_f1_hand_computed():
    # Punctuation and case do not matter; the best of several references counts.
    assert qa_exact_match_f1(["北京大学"], [["北京大学。", "北大"]]) == {"exact_match": 100.0, "f1": 100.0}
    assert qa_exact_match_f1(["  Peking University! "], [["peking university"]]) == {"exact_match": 100.0, "f1": 100.0}
    # 清华 vs 清华大学: common run 2, P = 1, R = 1/2, F1 = 2/3; against 北京大学 nothing.
    scores = qa_exact_match_f1(["清华"], [["北京大学", "清华大学"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 * 2 / 3)
    # CMRC counts the longest common contiguous run: 北京 or 大学, 2 of 4 each way.
    assert qa_exact_match_f1(["大学北京"], [["北京大学"]])["f1"] == pytest.approx(50.0)
    # English words are single units: [the, great, wall, 长, 城] vs [great, wall, 长, 城] → P 4/5, R 1.
    scores = qa_exact_match_f1(["the Great Wall长城"], [["Great Wall 长城"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 * 2 * 0.8 / 1.8)
    # Averaged over examples.
    scores = qa_exact_match_f1(["北京大学", "清华", "上海"], [["北京大学"], ["清华大学"], ["广州"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx((100 + 100 * 2 / 3 + 0) / 3)


def test_choice_logprobs_batched_equals_each_choice_alone():
    torch.manual_seed(0)
    # A larger init than the default makes the log-probabilities far from uniform, so padding mistakes show.
    config = DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    model = Decoder(config).eval()
    context = [1, 7, 3, 12]
    choices = [[4], [5, 6, 7], [8, 9], [30, 31, 32, 33, 34]]
    scores = choice_logprobs(model, context, choices)

    expected = []
    with torch.no_grad():
        for choice in choices:
            ids = torch.tensor([context + choice])
            log_probs = F.log_softmax(model(ids)[0], dim=-1)  # (T, vocab)
            total = sum(log_probs[len(context) - 1 + offset, token].item() for offset, token in enumerate(choice))
            expected.append(total)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1.0  # the test would notice choices scored with the wrong tokens
    assert not model.training


def test_mcq_accuracy():
    result = mcq_accuracy([True, True, False, False], num_choices=4)
    assert result == pytest.approx({"accuracy": 0.5, "chance": 0.25, "centred_accuracy": 1 / 3})
    assert mcq_accuracy([True, False], num_choices=2)["centred_accuracy"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bleu_chrf(["a"], ["a", "b"], "en"), "1 hypotheses but 2 references"),
        (lambda: bleu_chrf([], [], "zh"), "no examples"),
        (lambda: bleu_chrf(["a", "b"], ["a", " "], "en"), "reference 1 is empty"),
        (lambda: rouge(["你好", "再见"], ["你好", ""]), "reference 1 is empty"),
        (lambda: rouge(["你好"], []), "1 hypotheses but 0 references"),
        (lambda: classification_metrics([1, 2], [1]), "2 predictions but 1 labels"),
        (lambda: classification_metrics([], []), "no examples"),
        (lambda: classification_metrics([1, 3], [1, 2], label_names=[1, 2]), "label 3 is not in label_names"),
        (lambda: qa_exact_match_f1(["a"], [["a"], ["b"]]), "1 predictions but 2 reference lists"),
        (lambda: qa_exact_match_f1(["a", "b"], [["a"], []]), "reference list 1 is empty"),
        (lambda: qa_exact_match_f1(["a"], [["a", ""]]), "reference list 0 is empty"),
        (lambda: choice_logprobs(torch.nn.Linear(1, 1), [], [[1]]), "context_ids is empty"),
        (lambda: choice_logprobs(torch.nn.Linear(1, 1), [1], [[2], []]), "choice 1 has no tokens"),
        (lambda: mcq_accuracy([]), "no examples"),
        (lambda: mcq_accuracy([True], num_choices=1), "at least 2"),
    ],
)
def test_bad_input_is_a_user_error(call, message):
    with pytest.raises(UserError, match=message):
        call()


def test_text_units_split_cjk_and_punctuation_per_character_and_words_whole():
    assert text_units("人、人、") == ["人", "、", "人", "、"]
    assert text_units("１９９７年１０００００") == ["１９９７", "年", "１０００００"]
    assert text_units("The cat，GPT-4 说") == ["the", "cat", "，", "gpt", "-", "4", "说"]


def test_distinct_2_and_repeated_4grams_by_hand():
    loop = "人、人、人、人"  # 7 units
    # bigrams 人、 、人 人、 、人 人、 、人: 6, of which 2 distinct;
    # 4-grams 人、人、 、人、人 人、人、 、人、人: the last 2 of 4 repeat earlier ones
    assert distinct_n([loop], 2) == pytest.approx(2 / 6)
    assert repeated_ngram_share([loop], 4) == pytest.approx(2 / 4)
    varied = "今天天气很好"  # bigrams 今天 天天 天气 气很 很好 all distinct; 4-grams 3, none repeated
    assert distinct_n([varied], 2) == 1.0 and repeated_ngram_share([varied], 4) == 0.0
    # Over several texts: distinct-2 counts distinct bigrams across all of them (11 bigrams, 2 + 5 distinct) ...
    assert distinct_n([loop, varied], 2) == pytest.approx(7 / 11)
    # ... and a bigram shared by two texts is counted once: 今天 天天 twice, 4 bigrams, 2 distinct.
    assert distinct_n(["今天天", "今天天"], 2) == pytest.approx(2 / 4)
    # ... while rep-4 counts repeats within each text only: the same text twice repeats nothing across texts.
    assert repeated_ngram_share([varied, varied], 4) == 0.0
    assert repeated_ngram_share([loop, varied], 4) == pytest.approx(2 / 7)
    assert degeneration(["the cat the cat"]) == {"distinct_2": pytest.approx(2 / 3), "repeated_4grams": 0.0}
    assert distinct_n(["好"], 2) == 0.0 and repeated_ngram_share([], 4) == 0.0  # nothing to count
