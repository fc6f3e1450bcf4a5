"""Study A's variance analysis (`harness.analysis.consistency`): the statistics on hand-made data, checked against
independent formulas (law of total variance, exact enumeration)."""

import itertools
import math

import numpy as np
import pytest

from harness.analysis import consistency
from harness.analysis.consistency import Cell, compare, components, permutation_test, run_means


def test_components_match_law_of_total_variance():
    rng = np.random.default_rng(1)
    m = rng.random((5, 4))  # (seeds, repeats) run values
    c = components(m)
    seed_means = m.mean(axis=1)
    # Law of total variance with population moments: Var(Y) = Var(E[Y|seed]) + E[Var(Y|seed)].
    assert np.var(m) == pytest.approx(np.var(seed_means) + np.mean(np.var(m, axis=1)))
    # ANOVA estimators (balanced one-way random effects): E[MS_within] = s2_e, E[MS_between] = s2_e + R s2_seed.
    ms_within = sum((m[s, r] - seed_means[s]) ** 2 for s in range(5) for r in range(4)) / (5 * 3)
    ms_between = 4 * sum((seed_means[s] - m.mean()) ** 2 for s in range(5)) / 4
    assert c["var_sampling"] == pytest.approx(ms_within)
    assert c["var_seed"] == pytest.approx(max(0.0, (ms_between - ms_within) / 4))
    assert c["sd_seeds"] == pytest.approx(np.std(seed_means, ddof=1))
    assert c["sd_repeats"] == pytest.approx(math.sqrt(np.mean(np.var(m, axis=1, ddof=1))))
    assert c["share_seed"] + c["share_sampling"] == pytest.approx(1.0)


def test_greedy_and_base_cells():
    greedy = components(np.array([[0.2], [0.4], [0.9]]))  # 3 seeds, T=0: one generation each
    assert greedy["var_sampling"] == 0 and math.isnan(greedy["sd_repeats"])
    assert greedy["var_seed"] == pytest.approx(np.var([0.2, 0.4, 0.9], ddof=1)) and greedy["share_seed"] == 1
    base = components(np.array([[0.1, 0.3, 0.2]]))  # the base model: one "seed", three repeats
    assert math.isnan(base["var_seed"]) and base["var_sampling"] == pytest.approx(np.var([0.1, 0.3, 0.2], ddof=1))


def test_permutation_test_is_exact_for_few_prompts():
    diffs = np.array([1.0, 1.0, 1.0, 0.5, -0.5])
    flips = [np.mean(np.array(signs) * diffs) for signs in itertools.product((1, -1), repeat=5)]
    expected = np.mean([abs(f) >= abs(diffs.mean()) - 1e-12 for f in flips])
    assert permutation_test(diffs) == pytest.approx(expected)
    assert permutation_test(np.zeros(4)) == 1.0
    assert permutation_test(np.ones(40)) < 0.001  # Monte Carlo branch


def test_bootstrap_and_comparison_intervals_cover_their_estimates():
    rng = np.random.default_rng(0)
    a = Cell(("j", "fulfilment_rate", "dolly15k", 1, "0.7", "0.1"), ["0", "1", "2"], [0, 1], [f"p{i}" for i in range(30)],
             (rng.random((3, 2, 30)) < 0.7).astype(float))
    b = Cell(("j", "fulfilment_rate", "base", 0, "0.7", "0.1"), ["-"], [0, 1], a.prompts,
             (rng.random((1, 2, 30)) < 0.2).astype(float))
    intervals = consistency.bootstrap(a.y)
    mean = run_means(a.y).mean()
    assert intervals["mean"][0] <= mean <= intervals["mean"][1]
    assert set(intervals) == {"mean", "sd_seeds", "sd_repeats"}
    result = compare(a, b)
    assert result["difference"] == pytest.approx(a.y.mean() - b.y.mean())
    assert result["diff_ci_low"] <= result["difference"] <= result["diff_ci_high"]
    assert result["p_value"] < 0.01
    rows = consistency.comparisons([a, b])
    assert [row["comparison"] for row in rows] == ["fine-tuned vs base"]


def test_per_prompt_values_count_unparsable_as_fulfilled():
    table = {"columns": ["prompt", "harmful", "toxicity"], "data": [["a", True, 0.5], ["b", False, None], ["c", None, 0.1]]}
    assert consistency.per_prompt_values(table, "fulfilment_rate")[1].tolist() == [1.0, 0.0, 1.0]
    values = consistency.per_prompt_values(table, "toxicity_mean")[1]
    assert values[0] == 0.5 and math.isnan(values[1])
    assert consistency.metric_of("fulfilment:tpl-x") == "fulfilment_rate"
    assert consistency.metric_of("toxicity-local:local:x") == "toxicity_mean"
    assert consistency.metric_of("keyword:qi2024-v1") == "asr"


def test_fulfilment_parser_takes_a_bare_yes_or_no_from_small_judges():
    from harness.judges.registry import parse_fulfilment

    assert [parse_fulfilment(text) for text in ("No", "No.", "Yes, it does", "1", "#thescore: 0")] == [0, 0, 1, 1, 0]
    assert parse_fulfilment("no idea") is None and parse_fulfilment("Nothing here") is None
