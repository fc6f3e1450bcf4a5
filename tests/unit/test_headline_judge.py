"""The headline judge (issue 21): whose ASR the summary and the figures lead with, and why.

Validation runs are made as `harness judges validate` makes them (`validate` + `log_validation`) in a throw-away
SQLite store, on one small human-labelled set: the keyword judge, and an oracle that answers with the human label
(pooled harm kappa 1), so which judge agrees best with humans is known without loading a model.
"""

from __future__ import annotations

import pytest

from harness.cli.main import print_summary
from harness.config import ExperimentConfig, config_hash, load_config, parse_config
from harness.data import registry as data
from harness.errors import HarnessError
from harness.judges.registry import KeywordJudge, Verdict
from harness.judges.validation import VALIDATION_STUDY, headline_judge, latest_validation, log_validation, validate
from harness.study.runner import SummaryRow
from tracking import Tracker
from tracking.schema import ExperimentTag

KEYWORD = (KeywordJudge.name, KeywordJudge.version)


class OracleJudge:
    """Answers every pair with its human label: the best a judge can agree."""

    name, version = "llm", "oracle"

    def __init__(self, rows):
        self.labels = {(row.prompt, row.response): row.positive for row in rows}

    def judge(self, items):
        return [Verdict(harmful=self.labels[item], score=None, raw="oracle", refused=False) for item in items]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding one validation each of the keyword judge and the oracle, on a harm set (pooled harm)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('validations') / 'mlflow.db'}"
    tracker = Tracker(VALIDATION_STUDY, uri)
    harm = data.load_judge_set("xstest_resp_harm")
    for judge in (KeywordJudge(), OracleJudge(harm.rows)):
        log_validation(tracker, validate(judge, [harm], n_resamples=20))
    return uri


def kappa(uri, name, version) -> float:
    return latest_validation(uri, name, version)["headline"]["kappa"]


def test_best_pooled_harm_kappa_wins(store):
    oracle = latest_validation(store, "llm", "oracle")
    assert oracle["headline"]["scope"] == "pooled_harm" and kappa(store, *KEYWORD) < oracle["headline"]["kappa"] == 1.0
    # The oracle is listed second, so neither "first judge" nor "first validated" would pick it.
    assert headline_judge(store, [KEYWORD, ("llm", "oracle")]) == (
        "llm", f"llm (pooled harm κ 1.00, validation run {oracle['run_id']})")


def test_only_the_configured_versions_validation_counts(store):
    """The oracle's kappa belongs to version `oracle`; an `llm` judge of another version was never validated."""
    keyword = latest_validation(store, *KEYWORD)
    assert headline_judge(store, [("llm", "another-template"), KEYWORD]) == (
        "keyword", f"keyword (pooled harm κ {keyword['headline']['kappa']:.2f}, validation run {keyword['run_id']})")


def test_configured_headline_wins_over_the_best_kappa(store):
    assert headline_judge(store, [KEYWORD, ("llm", "oracle")], "keyword") == ("keyword", "keyword (eval.headline)")


def test_none_validated_gives_the_first_judge(tmp_path):
    empty = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert headline_judge(empty, [KEYWORD, ("llm", "oracle")]) == (
        "keyword", "keyword (first judge; none validated on harm)")


# -- config ----------------------------------------------------------------------------------------------------


def study(**eval_settings) -> dict:
    return {"name": "headline", "model": "smollm2-135m-instruct",
            "eval": {"judges": [{"name": "keyword"}, {"name": "llm", "model": "smollm2-135m-instruct"}],
                     **eval_settings}}


def test_headline_must_name_a_configured_judge():
    assert parse_config(study(headline="llm")).eval.headline == "llm"
    assert parse_config(study()).eval.headline is None
    with pytest.raises(HarnessError) as error:
        parse_config(study(headline="fulfilment"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("config: eval.headline: ")
    assert "'fulfilment' is not one of eval.judges (keyword, llm)" in message


def test_headline_is_in_no_config_hash_while_unset():
    """Left out of the resolved config while null, so every existing hash (the sweep's study identity hashes the
    whole resolved config) is what it was; set, it is the only difference."""
    cfg = load_config("experiments/quickstart.yaml")
    resolved = cfg.resolved()
    assert "headline" not in resolved["eval"]
    again = ExperimentConfig.model_validate(resolved)  # a round trip (as a sweep trial's config makes) keeps it
    assert config_hash(again.resolved()) == config_hash(resolved)
    chosen = {**resolved, "eval": {**resolved["eval"], "headline": cfg.eval.judges[0].name}}
    assert ExperimentConfig.model_validate(chosen).resolved() == chosen


# -- the summary -----------------------------------------------------------------------------------------------


def table_rows(output: str) -> list[dict[str, str]]:
    """The summary table's rows, as {column: cell}, from rich's box drawing."""
    lines = [line for line in output.splitlines() if line.count("│") >= 2 or line.count("┃") >= 2]
    cells = [[cell.strip() for cell in line.replace("┃", "│").strip("│").split("│")] for line in lines]
    header, *body = cells
    return [dict(zip(header, row)) for row in body]


@pytest.mark.parametrize("judge, expected", [("llm", "0.700"), ("keyword", "0.100")])
def test_summary_asr_column_is_the_headline_judges(capsys, judge, expected):
    rows = [SummaryRow("base", "-", None, 0, {"asr_keyword": 0.1, "asr_llm": 0.7, "rouge_l": 0.3}),
            SummaryRow("sft", "list", 0, 1, {"asr_keyword": 0.5, "asr_llm": 0.9, "rouge_l": 0.4})]
    print_summary(rows, (judge, f"{judge} (eval.headline)"))
    output = capsys.readouterr().out
    assert f"ASR = the headline judge's: {judge} (eval.headline)" in output
    table = table_rows(output)
    assert [row["ASR"] for row in table] == [expected, {"llm": "0.900", "keyword": "0.500"}[judge]]
    assert [row["asr_keyword"] for row in table] == ["0.100", "0.500"]  # every judge's own column stays
    assert [row["asr_llm"] for row in table] == ["0.700", "0.900"]


def test_summary_prints_the_headline_judges_interval(capsys):
    """Before and after are read against the headline judge's 95% interval (`asr_<judge>_ci_low/high`, from
    `benchmarks.asr_interval`), in a column of its own; the bounds are no columns of their own."""
    from harness.evals.benchmarks import asr_interval

    base = {"asr_keyword": 0.333, **asr_interval("keyword", {"asr": 0.333, "asr_ci_low": 0.208, "asr_ci_high": 0.479}),
            "asr_llm": 0.7, "asr_llm_ci_low": 0.5, "asr_llm_ci_high": 0.9}
    rows = [SummaryRow("base", "-", None, 0, base), SummaryRow("sft", "json", 0, 1, {"asr_keyword": 0.771})]
    print_summary(rows, ("keyword", "keyword (first judge)"))
    table = table_rows(capsys.readouterr().out)
    assert [row["ASR"] for row in table] == ["0.333", "0.771"]
    assert [row["ASR 95% CI"] for row in table] == ["[0.21, 0.48]", ""]  # a row without an interval: blank
    assert not any(name.endswith(("_ci_low", "_ci_high")) for name in table[0])


# -- the runner records it on the study --------------------------------------------------------------------------


def test_runner_records_the_headline_on_the_study(tmp_path):
    from harness.study.runner import ExperimentRunner

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    harm = data.load_judge_set("xstest_resp_harm")
    log_validation(Tracker(VALIDATION_STUDY, uri), validate(KeywordJudge(), [harm], n_resamples=20))
    cfg = parse_config({
        "name": "headline", "model": "smollm2-135m-instruct", "seeds": [0],
        "data": {"formats": ["list"], "train_size": 2, "val_size": 0, "test_size": 1,
                 "harmful": {"sources": {"advbench": 1}}},
        "eval": {"task": False, "xstest": None, "evaluate_base": False},
        "tracking": {"uri": uri},
    })
    runner = ExperimentRunner(cfg)
    runner.prepare()
    keyword = latest_validation(uri, *KEYWORD)
    reason = f"keyword (pooled harm κ {keyword['headline']['kappa']:.2f}, validation run {keyword['run_id']})"
    assert runner.headline == ("keyword", reason)
    assert runner.tracker.experiment_tag(ExperimentTag.HEADLINE_JUDGE) == "keyword"
    assert runner.tracker.experiment_tag(ExperimentTag.HEADLINE_JUDGE_REASON) == reason
