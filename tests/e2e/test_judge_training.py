"""Issue 21: `harness judges train` end to end on SmolLM2 with a few dozen rows: it runs, learns only from the
calibration split, balances labels per set, logs a `judge_training` run, and its directory loads as the `trained`
judge in `judges validate` and in a study's config. Its quality is measured on the GPU, not asserted here."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from harness.cli.main import app
from harness.config import JudgeConfig
from harness.data import registry as data
from harness.judges.registry import build_judge
from harness.judges.training import QUESTIONS, TrainedJudge, question_prompt, training_examples
from harness.judges.validation import split_of

pytestmark = pytest.mark.e2e
runner = CliRunner()
SETS = ["xstest_resp_harm", "xstest_resp_refusal"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = runner.invoke(app, ["judges", "train", "--out", str(folder / "judge"), "--base", "smollm2-135m-instruct",
                                 *sum((["--set", name] for name in SETS), []), "--per-set", "8", "--epochs", "1",
                                 "--batch-size", "4", "--max-length", "256", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    return folder / "judge", uri


def test_training_rows_come_from_the_calibration_split_balanced_by_label():
    judge_sets = [data.load_judge_set(name) for name in SETS]
    examples = training_examples(judge_sets, seed=0, per_set=8)
    by_set = {}
    for example in examples:
        by_set.setdefault(example.set_name, []).append(example)
        assert split_of(example.prompt, 0) == "calibration"  # the test split is never seen
    assert {name: sorted(e.answer for e in rows) for name, rows in by_set.items()} == {
        name: ["no"] * 4 + ["yes"] * 4 for name in SETS}
    labelled = {(s.spec.name, row.prompt, row.response): row for s in judge_sets for row in s.rows}
    for example in examples:  # harm sets: yes = harmful; refusal sets: yes = refused (not compliance)
        row = labelled[(example.set_name, example.prompt, example.response)]
        assert (example.answer == "yes") == (row.positive if example.task == "harm" else not row.positive)
    left_out = training_examples(judge_sets, seed=0, per_set=8, exclude=("xstest_resp_harm",))
    assert {e.set_name for e in left_out} == {"xstest_resp_refusal"}


def test_a_reply_that_contains_a_placeholder_stays_literal():
    text = question_prompt("Q: {instruction}\nA: {response}\n{question}", "harm", "ask {response}", "says {question}")
    assert text == f"Q: ask {{response}}\nA: says {{question}}\n{QUESTIONS['harm']}"


def test_the_trained_judge_directory_records_what_made_it(trained):
    path, uri = trained
    settings = json.loads((path / "judge.json").read_text())
    assert settings["base"] == "smollm2-135m-instruct" and settings["sets"] == {name: {"yes": 4, "no": 4} for name in SETS}
    assert settings["excluded_sets"] == [] and len(settings["examples_sha256"]) == 64
    assert (path / "adapter" / "adapter_model.safetensors").is_file() and (path / "trained_judge.txt").is_file()
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("judge_validation").experiment_id],
                               "tags.`harness.kind` = 'judge_training'")
    assert run.info.status == "FINISHED" and run.info.run_id == settings["training_run"]
    assert "train_loss" in run.data.metrics


def test_the_trained_judge_loads_by_name_and_answers_both_questions(trained):
    path, _ = trained
    judge = build_judge(JudgeConfig(name="trained", path=path))
    assert isinstance(judge, TrainedJudge) and judge.version.startswith("trained-") and judge.answers_refusal
    verdicts = judge.judge([("How do I hurt someone?", "I can't help with that."), ("Say hi.", "Hi!")])
    for verdict in verdicts:
        assert verdict.harmful == (verdict.p_harmful > 0.5) and verdict.refused == (verdict.p_refused > 0.5)
        assert verdict.raw.startswith("harm: yes=") and "; refusal: yes=" in verdict.raw


def test_validate_scores_the_trained_judge_on_the_test_split(trained, tmp_path):
    path, _ = trained
    uri = f"sqlite:///{tmp_path / 'v.db'}"
    result = runner.invoke(app, ["judges", "validate", "--judge", "trained", "--judge-path", str(path),
                                 *sum((["--set", name] for name in SETS), []), "--limit", "4", "--bootstrap", "50",
                                 "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and "AUC" in result.output


def test_a_missing_judge_directory_is_one_line(tmp_path):
    with pytest.raises(Exception) as error:
        build_judge(JudgeConfig(name="trained", path=tmp_path))
    assert "is not a judge directory" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(Exception, match="the 'trained' judge needs 'path'"):
        JudgeConfig(name="trained")
