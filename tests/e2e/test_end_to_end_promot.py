"""ProMoT through the real CLI: both stages as nested runs, checkpoints under stage 2, evaluations with and
without the soft prompt, the prompt saved as an artifact. One small study (JSON, one epoch) per session."""

import json
from pathlib import Path

import pytest

from helpers import of_kind, run_study, tag

pytestmark = pytest.mark.e2e

PROMOT_STUDY = {
    "name": "e2e-promot",
    "model": "smollm2-135m-instruct",
    "data": {
        "formats": ["json"],
        "train_size": 8,
        "val_size": 2,
        "test_size": 3,
        "harmful": {"sources": {"advbench": 2, "directharm4": 1}},
    },
    "train": {
        "methods": ["promot"], "learning_rate": 3e-4, "batch_size": 4, "grad_accum": 1, "epochs": 1,
        "warmup_steps": 0, "max_length": 192,
        "promot": {"prompt_length": 4, "evaluate_with_prompt": True,
                   "stage1": {"learning_rate": 0.01, "batch_size": 4, "grad_accum": 1, "epochs": 0.5, "warmup_steps": 0}},
    },
    "eval": {"batch_size": 8, "evaluate_base": False, "decoding": [{"temperature": 0, "max_new_tokens": 8}],
             "judges": [{"name": "keyword"}], "xstest": {"safe": 2, "unsafe": 1}},
}


@pytest.fixture(scope="module")
def promot_study(tmp_path_factory):
    _, client, runs = run_study(tmp_path_factory.mktemp("promot"), PROMOT_STUDY)
    return client, runs


def test_promot_runs_nest_finetune_stages_checkpoint_evaluations(promot_study):
    client, runs = promot_study
    assert all(run.info.status == "FINISHED" for run in runs)
    (finetune,) = of_kind(runs, "finetune")
    assert tag(finetune, "method") == "promot" and tag(finetune, "format") == "json"
    stages = {tag(run, "stage"): run for run in of_kind(runs, "stage")}
    assert set(stages) == {"1", "2"}
    assert all(run.data.tags["mlflow.parentRunId"] == finetune.info.run_id for run in stages.values())
    # Stage 1: 8 rows / batch 4 × 0.5 epoch = 1 step; stage 2: 2 steps. Each stage has its own loss curve.
    assert len(client.get_metric_history(stages["1"].info.run_id, "train_loss")) == 1
    assert len(client.get_metric_history(stages["2"].info.run_id, "train_loss")) == 2
    artifacts = {item.path for item in client.list_artifacts(stages["1"].info.run_id, "soft_prompt")}
    assert artifacts == {"soft_prompt/soft_prompt.safetensors", "soft_prompt/soft_prompt.json"}
    meta = json.loads(Path(client.download_artifacts(stages["1"].info.run_id, "soft_prompt/soft_prompt.json")).read_text())
    assert meta["length"] == 4 and meta["format"] == "json" and meta["shape"] == [4, 576]
    (checkpoint,) = of_kind(runs, "checkpoint")
    assert checkpoint.data.tags["mlflow.parentRunId"] == stages["2"].info.run_id and tag(checkpoint, "epoch") == "1"


def test_promot_evaluations_without_and_with_the_prompt(promot_study):
    _, runs = promot_study
    evaluations = of_kind(runs, "evaluation")
    with_prompt = [run for run in evaluations if tag(run, "soft_prompt") == "True"]
    without = [run for run in evaluations if tag(run, "soft_prompt") is None]
    # harmful mix, XSTest unsafe and safe (keyword judge) + wikihow json, once without and once with the soft prompt
    assert len(without) == 4 and len(with_prompt) == 4
    for group in (with_prompt, without):
        task = [run for run in group if tag(run, "benchmark") == "wikihow"]
        assert len(task) == 1 and {"rouge_l", "sbert", "format_adherence"} <= set(task[0].data.metrics)
        safety = [run for run in group if tag(run, "benchmark") == "harmful_mix"]
        assert len(safety) == 1 and "asr" in safety[0].data.metrics
        assert tag(safety[0], "judge_validation") == "none"  # no validation was logged in this store
    assert {run.data.params.get("soft_prompt") for run in with_prompt} == {"True"}
