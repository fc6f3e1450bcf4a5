"""MLflow's own views of a study (issue 23): what the MLflow UI shows is in the store, read back the way the UI
reads it, through the REST handlers `mlflow server` serves (`/ajax-api/2.0/mlflow/...`).

A real study (a 2-layer random Llama over SmolLM2's tokenizer: SFT on 2 WikiHow procedures, evaluated on
AdvBench, XSTest and the task test) and `harness figures` on it write a SQLite store in tmp_path. The server's
Flask app answers in this process: starting `mlflow server` took 17-38 s on these 2 shared cores; the handlers are the
same. Every expected value is computed here from its origin (the data files' bytes and rows, `git`), not taken
from the harness.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from harness.data import registry as data
from tracking.datasets import DIGEST_LENGTH, DatasetRecord
from tracking.provenance import mlflow_source_tags, provenance

REPO = Path(__file__).resolve().parents[2]
STUDY = "views"
FILES = {  # registry name -> its file under the data directory (all CSV: rows are counted with the csv module)
    "wikihow": "wikihow_lists_summary/wikihow_lists_summary_first3000.csv",
    "advbench": "advbench/harmful_behaviors.csv",
    "xstest": "xstest/xstest_prompts.csv",
}
BENCHMARK_SOURCES = {"harmful_mix": ["advbench"], "xstest_safe": ["xstest"], "xstest_unsafe": ["xstest"],
                     "wikihow": ["wikihow"]}


def expected_dataset(name: str) -> dict:
    """What MLflow should hold for a data file: digest = its sha256 (cut to MLflow's 36), its record count."""
    path = data.resolve_data_dir() / FILES[name]
    with path.open(newline="", encoding="utf-8") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    return {"name": name, "digest": hashlib.sha256(path.read_bytes()).hexdigest()[:36], "rows": rows,
            "source": str(path.resolve())}


def git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    """The study, then `harness figures` on it: (folder, store URI, figures folder, CLI result)."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from harness import models
    from harness.cli.main import app
    from harness.config import parse_config
    from harness.study.runner import run_experiment
    from helpers import tiny_llama

    folder = tmp_path_factory.mktemp("views")
    model = folder / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m-instruct").location)
    tokenizer.save_pretrained(model)
    tiny_llama(tokenizer).save_pretrained(model)
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    cfg = parse_config({
        "name": STUDY, "model": str(model), "seeds": [0], "output_dir": str(folder / "outputs"),
        "data": {"formats": ["list"], "train_size": 2, "val_size": 1, "test_size": 1,
                 "harmful": {"sources": {"advbench": 2}}},
        "train": {"methods": ["sft"], "epochs": 2, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0,
                  "max_length": 64},
        "eval": {"batch_size": 8, "decoding": [{"temperature": 0, "max_new_tokens": 2}],
                 "judges": [{"name": "keyword"}], "xstest": {"safe": 1, "unsafe": 1}},
        "tracking": {"uri": uri},
    })
    run_experiment(cfg)
    out = folder / "figures"
    shown = CliRunner().invoke(app, ["figures", "--study", STUDY, "--out", str(out), "--tracking-uri", uri])
    assert shown.exit_code == 0, shown.output
    return folder, uri, out, shown


@pytest.fixture(scope="module")
def rest(study):
    """A client of the MLflow server's REST handlers on the study's store (the UI's `/ajax-api/...` calls)."""
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR, app, handlers
    from mlflow.tracking._tracking_service import utils

    patch = pytest.MonkeyPatch()
    patch.setenv(BACKEND_STORE_URI_ENV_VAR, study[1])
    # The handlers set the process's tracking URI (and $MLFLOW_TRACKING_URI) to the store: undone afterwards.
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    patch.setattr(handlers, "_tracking_store", None)
    client = app.test_client()

    def call(method: str, endpoint: str, **payload):
        if method == "GET":
            answer = client.get(f"/ajax-api/2.0/mlflow/{endpoint}", query_string=payload)
        else:
            answer = client.post(f"/ajax-api/2.0/mlflow/{endpoint}", json=payload)
        assert answer.status_code == 200, (endpoint, answer.data[:500])
        return answer.get_json()

    call.client = client
    yield call
    patch.undo()


@pytest.fixture(scope="module")
def experiment(rest):
    return rest("GET", "experiments/get-by-name", experiment_name=STUDY)["experiment"]


@pytest.fixture(scope="module")
def runs(rest, experiment):
    """Every run as the runs table loads it: runs/search, with tags and dataset inputs."""
    found = rest("POST", "runs/search", experiment_ids=[experiment["experiment_id"]], max_results=1000)["runs"]
    for run in found:
        run["tags"] = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
    return found


def of_kind(runs: list, kind: str) -> list:
    return [run for run in runs if run["tags"].get("harness.kind") == kind]


def datasets_of(run: dict) -> list[dict]:
    """A run's Datasets column: name, digest, source, row count and the context tag of each input."""
    shown = []
    for entry in run.get("inputs", {}).get("dataset_inputs", []):
        dataset = entry["dataset"]
        shown.append({"name": dataset["name"], "digest": dataset["digest"],
                      "source": json.loads(dataset["source"]).get("uri"),
                      "rows": json.loads(dataset.get("profile") or "{}").get("num_rows"),
                      "context": {tag["key"]: tag["value"] for tag in entry.get("tags", [])}.get("mlflow.data.context")})
    return sorted(shown, key=lambda item: item["name"])


# -- the experiment opens on its training runs ------------------------------------------------------------


def test_the_study_is_a_machine_learning_experiment(experiment):
    tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's "Machine learning" kind


def test_a_study_made_before_gets_the_kind_with_its_next_run_and_a_user_choice_stays(tmp_path):
    from mlflow import MlflowClient

    from tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("old")  # as an earlier harness made it: no kind
    rekinded = client.create_experiment("rekinded", tags={"mlflow.experimentKind": "finetuning"})
    reader = Tracker("old", uri)  # opening a study to read it (the figures) writes nothing
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    with reader.run("report", "probe", {}):
        pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    with Tracker("rekinded", uri).run("report", "probe", {}):
        pass
    assert client.get_experiment(rekinded).tags["mlflow.experimentKind"] == "finetuning"


# -- every dataset a run reads is an MLflow dataset input ------------------------------------------------


def test_the_finetune_records_its_training_set(runs):
    (finetune,) = of_kind(runs, "finetune")
    assert datasets_of(finetune) == [{**expected_dataset("wikihow"), "context": "training"}]


@pytest.mark.parametrize("kind", ["generation", "evaluation"])
def test_every_generation_and_evaluation_records_its_prompt_sets(runs, kind):
    made = of_kind(runs, kind)
    assert {run["tags"]["harness.benchmark"] for run in made} == set(BENCHMARK_SOURCES)
    for run in made:
        expected = [{**expected_dataset(name), "context": "evaluation"}
                    for name in BENCHMARK_SOURCES[run["tags"]["harness.benchmark"]]]
        assert datasets_of(run) == expected, run["info"]["run_name"]


def test_the_digest_is_the_checksum_the_study_records(experiment):
    """One sha256 behind both: `harness.dataset_checksums` (the drift check's) and MLflow's digest."""
    tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
    checksums = json.loads(tags["harness.dataset_checksums"])
    for name, rel in FILES.items():
        assert checksums[rel][:DIGEST_LENGTH] == expected_dataset(name)["digest"]


def test_a_hub_dataset_is_recorded_with_its_hub_source():
    record = DatasetRecord("gsm_danger", "vfleaking/GSM-Danger", "a" * 40, 188, ("prompt",), hub_split="test")
    entity = record.entity()
    assert (entity.name, entity.digest, entity.source_type) == ("gsm_danger", "a" * 36, "hugging_face")
    source = json.loads(entity.source)
    assert (source["path"], source["split"], source["revision"]) == ("vfleaking/GSM-Danger", "test", "a" * 40)
    assert json.loads(entity.profile) == {"num_rows": 188}


# -- MLflow's source, git and user fields ------------------------------------------------------------------


def test_every_run_names_its_source_and_commit_in_mlflow_fields(runs):
    commit, branch = git("rev-parse", "HEAD"), git("rev-parse", "--abbrev-ref", "HEAD")
    remotes = (git("remote") or "").split()  # the origin, else the first remote, else none (a local clone)
    remote = git("remote", "get-url", "origin" if "origin" in remotes else remotes[0]) if remotes else None
    assert commit, "these tests run in a git checkout"
    info = provenance()
    for run in runs:
        tags = run["tags"]
        assert tags["mlflow.source.git.commit"] == tags["harness.git_commit"] == commit
        assert tags.get("mlflow.source.git.branch") == (None if branch == "HEAD" else branch)
        assert tags.get("mlflow.source.git.repoURL") == remote
        assert tags["mlflow.source.name"] == info["program"] and tags["mlflow.source.type"] in ("LOCAL", "JOB")
        assert tags["mlflow.user"] == run["info"]["user_id"] != "unknown"


def test_the_source_type_says_whether_a_job_made_the_run():
    info = {"git": {"commit": "c" * 40, "dirty": False, "branch": "main", "repo_url": "https://example.org/r.git"},
            "program": "/venv/bin/harness"}
    local = mlflow_source_tags(info, environ={})
    assert local["mlflow.source.type"] == "LOCAL" and local["mlflow.source.git.dirty"] == "false"
    assert local["mlflow.source.git.repoURL"] == "https://example.org/r.git"
    assert mlflow_source_tags(info, environ={"SLURM_JOB_ID": "7"})["mlflow.source.type"] == "JOB"
    exported = {"git": {"commit": "unknown", "dirty": None, "branch": None, "repo_url": None}, "program": None}
    tags = mlflow_source_tags(exported, environ={})  # an exported tree that lost its commit claims none
    assert not {"mlflow.source.git.commit", "mlflow.source.git.dirty", "mlflow.source.git.branch"} & set(tags)


# -- the three views the screenshots show (scripts/mlflow-screenshots.sh) ------------------------------------


def test_the_finetune_loss_chart_has_its_points(rest, runs):
    (finetune,) = of_kind(runs, "finetune")
    history = rest("GET", "metrics/get-history", run_uuid=finetune["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert len(history) >= 2 and all(point["value"] > 0 for point in history)


def test_an_evaluation_shows_its_per_prompt_table(rest, runs):
    (evaluation,) = [run for run in of_kind(runs, "evaluation") if run["tags"]["harness.benchmark"] == "harmful_mix"
                     and run["tags"].get("harness.method") == "sft" and run["tags"].get("harness.epoch") == "2"]
    listed = rest("GET", "artifacts/list", run_id=evaluation["info"]["run_id"])["files"]
    assert "per_prompt.json" in {entry["path"] for entry in listed}
    answer = rest.client.get("/get-artifact", query_string={"path": "per_prompt.json",
                                                            "run_uuid": evaluation["info"]["run_id"]})
    table = json.loads(answer.data)
    assert answer.status_code == 200 and len(table["data"]) == 2 and "response" in table["columns"]


# -- `harness figures` output is a report run ---------------------------------------------------------------


def test_figures_are_the_artifacts_of_a_report_run(rest, runs, study):
    _, _, out, shown = study
    (report,) = of_kind(runs, "report")
    assert report["tags"]["harness.report"] == "figures" and report["info"]["status"] == "FINISHED"
    assert report["info"]["run_id"] in shown.stdout
    listed = {entry["path"] for entry in rest("GET", "artifacts/list", run_id=report["info"]["run_id"])["files"]}
    written = {path.name for path in out.iterdir() if path.suffix in (".png", ".csv", ".md", ".html")}
    assert {"report.md", "report.html", "fig4_train_loss.png"} <= written
    assert listed - {"config.json", "provenance.json"} == written


def test_figures_can_leave_the_store_as_it_was(study, tmp_path):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from harness.cli.main import app

    _, uri, _, _ = study
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    before = len(client.search_runs([experiment]))
    shown = CliRunner().invoke(app, ["figures", "--study", STUDY, "--out", str(tmp_path), "--tracking-uri", uri,
                                     "--no-log-report"])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "report.html").is_file() and len(client.search_runs([experiment])) == before
