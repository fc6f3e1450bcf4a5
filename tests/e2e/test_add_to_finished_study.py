"""Issue 20, story 2: a finished study that gains a judge, a decoding setting or another prompt selection pays
only for the addition, through the real CLI on a real (tiny) model and a real MLflow store.

One small study (base model + one SFT fine-tune, one epoch: two model states) is run once; each test then
works on its own copy of the store (relocated, so nothing written to it reaches the original) and reruns the CLI with
the YAML changed, then counts in the store what was made and what was reused.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from helpers import ChatServer, relocate

HARNESS = [sys.executable, "-m", "harness.cli.main"]
N_STATES = 2  # the base model and the fine-tune's one checkpoint

STUDY = {
    "name": "grow",
    "model": "smollm2-135m-instruct",
    "seeds": [0],
    "data": {"formats": ["list"], "train_size": 2, "val_size": 1, "test_size": 1,
             "harmful": {"sources": {"advbench": 2, "directharm4": 1}}},
    "train": {"methods": ["sft"], "learning_rate": 3e-4, "batch_size": 2, "grad_accum": 1, "epochs": 1,
              "warmup_steps": 0, "max_length": 128},
    "eval": {"batch_size": 16, "decoding": [{"temperature": 0, "max_new_tokens": 4}],
             "judges": [{"name": "keyword"}], "xstest": {"safe": 1, "unsafe": 1}},
}
LLM_JUDGE = {"name": "llm", "model": "smollm2-135m-instruct", "max_new_tokens": 2, "template": "harm_judge_short.txt"}


def harness(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(HARNESS + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write(folder: Path, study: dict) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def made_and_reused(output: str) -> dict[str, int]:
    """The counts line the CLI prints after the summary."""
    found = re.search(r"generations: (\d+) made \((\d+) prompts\), (\d+) reused; evaluations: (\d+) made, (\d+) reused",
                      output)
    assert found, output[-2000:]
    return dict(zip(["generations_made", "prompts", "generations_reused", "evaluations_made", "evaluations_reused"],
                    map(int, found.groups())))


def runs_by_kind(folder: Path) -> dict[str, dict[str, object]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY["name"])
    found: dict[str, dict[str, object]] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=5000):
        assert run.info.status == "FINISHED", run.data.tags.get("harness.error")
        found.setdefault(run.data.tags["harness.kind"], {})[run.info.run_id] = run
    return found


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grow")
    first = harness(["run", str(write(folder, STUDY))], folder)
    return folder, first.stdout


@pytest.fixture
def study_copy(finished_study, tmp_path):
    """A copy of the finished study this test may change; the store's artifact paths are relative to it."""
    folder, _ = finished_study
    copy = tmp_path / "study"
    relocate(folder, copy)
    return copy


def test_the_first_run_generates_once_per_state_benchmark_and_decoding(finished_study):
    folder, output = finished_study
    counts = made_and_reused(output)
    # harmful mix, XSTest unsafe, XSTest safe, task test rows: four prompt sets per model state
    assert counts["generations_made"] == 4 * N_STATES and counts["generations_reused"] == 0
    assert counts["prompts"] == (3 + 1 + 1 + 1) * N_STATES
    runs = runs_by_kind(folder)
    assert len(runs["generation"]) == 4 * N_STATES
    for run in (run for kind in runs.values() for run in kind.values()):  # every run says how it computed
        assert json.loads(run.data.tags["harness.runtime"])["promot_precision"] == "fp32"
        assert run.data.tags["harness.runtime_overrides"] == "none"
    for run in runs["evaluation"].values():
        generation = runs["generation"][run.data.tags["harness.generation_run"]]
        assert generation.data.tags["harness.config_hash"] == run.data.tags["harness.generation_hash"]
        assert generation.data.tags["mlflow.parentRunId"] == run.data.tags["mlflow.parentRunId"]
        assert generation.data.tags["harness.benchmark"] == run.data.tags["harness.benchmark"]


def test_a_judge_added_to_a_finished_study_judges_stored_responses_and_generates_nothing(finished_study, study_copy):
    before = runs_by_kind(study_copy)
    grown = {**STUDY, "eval": {**STUDY["eval"], "judges": [{"name": "keyword"}, LLM_JUDGE]}}
    done = harness(["evaluate", str(write(study_copy, grown))], study_copy)

    counts = made_and_reused(done.stdout)
    # the LLM judge scores the harmful mix and XSTest's unsafe prompts; its over-refusal family is the keyword
    # judge's (already stored), and the task scores do not depend on judges
    assert counts["generations_made"] == 0 and counts["prompts"] == 0, "a judge added made the model generate"
    assert counts["generations_reused"] == 2 * N_STATES
    assert counts["evaluations_made"] == 2 * N_STATES
    assert counts["evaluations_reused"] == len(before["evaluation"])
    after = runs_by_kind(study_copy)
    assert after["generation"].keys() == before["generation"].keys()
    assert after["finetune"].keys() == before["finetune"].keys() and after["checkpoint"].keys() == before["checkpoint"].keys()
    new = [after["evaluation"][run_id] for run_id in after["evaluation"].keys() - before["evaluation"].keys()]
    assert len(new) == 2 * N_STATES and before["evaluation"].keys() <= after["evaluation"].keys()
    assert {run.data.tags["harness.judge"].split(":")[0] for run in new} == {"llm"}
    for run in new:  # judged from the stored responses of the right record
        generation = after["generation"][run.data.tags["harness.generation_run"]]
        assert generation.data.tags["harness.benchmark"] == run.data.tags["harness.benchmark"]
    assert "asr_llm" in done.stdout

    again = made_and_reused(harness(["run", str(write(study_copy, grown))], study_copy).stdout)
    assert again["generations_made"] == again["evaluations_made"] == 0, "a rerun of the grown study recomputed"


def test_an_http_judge_named_in_the_yaml_judges_the_stored_responses_on_its_server(finished_study, study_copy):
    """The `http` judge from the config (a local server speaking the OpenAI chat protocol stands in for vLLM
    or a hosted API): every stored harmful and XSTest-unsafe response is sent to it once, nothing is generated."""
    server = ChatServer(["#thescore: 5"] * 100)
    try:
        http = {"name": "http", "base_url": server.url, "model": "served-judge", "max_new_tokens": 4}
        grown = {**STUDY, "eval": {**STUDY["eval"], "judges": [{"name": "keyword"}, http]}}
        before = runs_by_kind(study_copy)
        counts = made_and_reused(harness(["run", str(write(study_copy, grown))], study_copy).stdout)
    finally:
        server.close()
    assert counts["generations_made"] == 0 and counts["evaluations_made"] == 2 * N_STATES
    # one response each, plus the one-token request that asks whether the server sends log-probabilities (it does
    # not, so the judge reads text and its version says so)
    assert len(server.requests) == (3 + 1) * N_STATES + 1
    assert server.requests[0]["body"].get("logprobs") is True
    assert not any(request["body"].get("logprobs") for request in server.requests[1:])
    assert {request["body"]["model"] for request in server.requests} == {"served-judge"}
    after = runs_by_kind(study_copy)
    new = [after["evaluation"][i] for i in after["evaluation"].keys() - before["evaluation"].keys()]
    assert {run.data.tags["harness.judge"].split(":")[0] for run in new} == {"http"}
    assert all(run.data.metrics["asr"] == 1.0 for run in new)  # the server scored every response 5


def test_a_decoding_added_generates_only_that_decoding(finished_study, study_copy):
    before = runs_by_kind(study_copy)
    sampled = {"temperature": 0.7, "max_new_tokens": 4}
    grown = {**STUDY, "eval": {**STUDY["eval"], "decoding": [*STUDY["eval"]["decoding"], sampled]}}
    counts = made_and_reused(harness(["run", str(write(study_copy, grown))], study_copy).stdout)

    assert counts["generations_made"] == 4 * N_STATES and counts["generations_reused"] == 0
    assert counts["evaluations_made"] == len(before["evaluation"]), "the new decoding is not scored like the first"
    after = runs_by_kind(study_copy)
    new = [after["generation"][run_id] for run_id in after["generation"].keys() - before["generation"].keys()]
    assert {run.data.tags["harness.temperature"] for run in new} == {"0.7"}
    assert after["finetune"].keys() == before["finetune"].keys(), "a decoding added retrained"


def test_a_changed_prompt_selection_adds_units_beside_the_old_and_becomes_current(finished_study, study_copy):
    before = runs_by_kind(study_copy)
    client = MlflowClient(tracking_uri=f"sqlite:///{study_copy / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY["name"])
    old_current = json.loads(experiment.tags["harness.current_selection"])
    changed = {**STUDY, "data": {**STUDY["data"], "harmful": {"sources": {"advbench": 3, "directharm4": 1}}}}
    counts = made_and_reused(harness(["evaluate", str(write(study_copy, changed))], study_copy).stdout)

    assert counts["generations_made"] == N_STATES and counts["prompts"] == 4 * N_STATES  # only the harmful mix
    after = runs_by_kind(study_copy)
    assert before["evaluation"].keys() <= after["evaluation"].keys(), "an old evaluation was lost"
    new_generations = [after["generation"][i] for i in after["generation"].keys() - before["generation"].keys()]
    assert {run.data.tags["harness.benchmark"] for run in new_generations} == {"harmful_mix"}
    current = json.loads(client.get_experiment_by_name(STUDY["name"]).tags["harness.current_selection"])
    assert current["harmful_mix"] != old_current["harmful_mix"]
    assert {k: v for k, v in current.items() if k != "harmful_mix"} == {k: v for k, v in old_current.items()
                                                                       if k != "harmful_mix"}
    assert {run.data.tags["harness.selection"] for run in new_generations} == {current["harmful_mix"]}
    new_evaluations = [after["evaluation"][i] for i in after["evaluation"].keys() - before["evaluation"].keys()]
    assert new_evaluations and all(run.data.metrics["n_prompts"] == 4 for run in new_evaluations)

    report = study_copy / "figures"
    figures = harness(["figures", "--study", STUDY["name"], "--out", str(report),
                       "--tracking-uri", f"sqlite:///{study_copy / 'mlruns' / 'mlflow.db'}"], study_copy)
    text = figures.stdout + figures.stderr + (report / "report.md").read_text()
    assert re.search(r"\d+ evaluations? of (an )?earlier prompt selections? (is|are) not drawn", text), text[-3000:]


def test_the_finished_study_without_changes_makes_nothing(finished_study, study_copy):
    counts = made_and_reused(harness(["run", str(write(study_copy, STUDY))], study_copy).stdout)
    assert counts["generations_made"] == counts["evaluations_made"] == counts["generations_reused"] == 0
    assert counts["evaluations_reused"] == len(runs_by_kind(study_copy)["evaluation"])


def test_a_store_of_another_schema_version_is_refused_in_one_line(study_copy):
    client = MlflowClient(tracking_uri=f"sqlite:///{study_copy / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY["name"])
    client.set_experiment_tag(experiment.experiment_id, "harness.schema_version", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(HARNESS + ["run", str(study_copy / "study.yaml")], cwd=study_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "schema 1" in message[0] and "--new-version" in message[0], done.stderr[-2000:]
