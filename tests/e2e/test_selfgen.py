"""`harness selfgen`: the base model answers the fine-tuning instructions itself, and the answers become a
new dataset version (a JSONL named by its checksum and a `dataset` run) that a rerun reuses."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from harness.data import registry as data
from helpers import run_cli, tag

pytestmark = pytest.mark.e2e

STUDY = {
    "name": "selfgen",
    "model": "smollm2-135m-instruct",
    "data": {"task": "instructions", "finetune": {"datasets": ["dolly15k"], "size": 2,
                                                  "selfgen": {"enabled": True}},
             "harmful": {"sources": {"advbench": 1}}},
    "eval": {"task": False, "xstest": None, "decoding": [{"temperature": 0, "max_new_tokens": 6}],
             "judges": [{"name": "keyword"}]},
}


def test_selfgen_registers_a_dataset_version_and_reuses_it(tmp_path):
    config = tmp_path / "selfgen.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    first = run_cli(["selfgen", str(config)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(["selfgen", str(config)], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]  # same version, same run

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("selfgen")
    [run] = client.search_runs([experiment.experiment_id], "tags.`harness.kind` = 'dataset'")
    assert run.info.status == "FINISHED" and tag(run, "dataset") == "dolly15k-selfgen"
    assert tag(run, "responses") == "self-generated" and tag(run, "source_dataset") == "dolly15k"
    path = Path(tag(run, "dataset_path"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    source = data.instruction_sets(["dolly15k"], size=2)["dolly15k"][0]
    assert [(r["instruction"], r["input"]) for r in rows] == [(s.instruction, s.input) for s in source]
    assert all(r["output"] and r["output"] != s.response for r, s in zip(rows, source))  # the model's, not Dolly's
    version = data.rows_checksum([data.FinetuneRow(r["instruction"], r["input"], r["output"]) for r in rows])
    assert tag(run, "dataset_sha256") == version and path.name == f"dolly15k-selfgen-{version[:12]}.jsonl"
    assert [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "dataset")] == [path.name]
