"""ProMoT through the real CLI: both stages as nested runs, checkpoints under stage 2, evaluations with and
without the soft prompt, the prompt saved as an artifact. Read from the session's shared study
(tests/shared_store.py), which trains ProMoT on every format with `evaluate_with_prompt`; checked on JSON."""

import json
import math
from pathlib import Path

import pytest

import shared_store
from helpers import of_kind, tag
from shared_store import BATCH_SIZE, EPOCHS, FORMATS, JUDGES, PROMPT_LENGTH, SHARED_STUDY, TRAIN_SIZE

pytestmark = pytest.mark.e2e
BACKGROUND_JOBS = [shared_store.JOB]

FORMAT = "json"
STAGE1_EPOCHS = SHARED_STUDY["train"]["promot"]["stage1"]["epochs"]


@pytest.fixture(scope="module")
def promot_study(shared_study):
    return shared_study.client, shared_study.runs


def test_promot_runs_nest_finetune_stages_checkpoint_evaluations(promot_study):
    client, runs = promot_study
    assert all(run.info.status == "FINISHED" for run in runs)
    promot = [run for run in of_kind(runs, "finetune") if tag(run, "method") == "promot"]
    assert sorted(tag(run, "format") for run in promot) == sorted(FORMATS)
    (finetune,) = [run for run in promot if tag(run, "format") == FORMAT]
    assert tag(finetune, "method") == "promot" and tag(finetune, "format") == "json"
    stages = {tag(run, "stage"): run for run in of_kind(runs, "stage")
              if run.data.tags["mlflow.parentRunId"] == finetune.info.run_id}
    assert set(stages) == {"1", "2"}
    by_id = {run.info.run_id: run for run in runs}
    assert len(of_kind(runs, "stage")) == 2 * len(promot)  # two stages under each ProMoT fine-tune, nowhere else
    assert {by_id[run.data.tags["mlflow.parentRunId"]].info.run_id for run in of_kind(runs, "stage")} == {
        run.info.run_id for run in promot}
    # Stage 1: 4 rows / batch 2 × 0.5 epoch = 1 step; stage 2: 4 rows / batch 2 × 2 epochs = 4 steps. Each stage
    # has its own loss curve.
    steps = TRAIN_SIZE // BATCH_SIZE
    assert len(client.get_metric_history(stages["1"].info.run_id, "train_loss")) == math.ceil(steps * STAGE1_EPOCHS) == 1
    assert len(client.get_metric_history(stages["2"].info.run_id, "train_loss")) == steps * EPOCHS
    artifacts = {item.path for item in client.list_artifacts(stages["1"].info.run_id, "soft_prompt")}
    assert artifacts == {"soft_prompt/soft_prompt.safetensors", "soft_prompt/soft_prompt.json"}
    meta = json.loads(Path(client.download_artifacts(stages["1"].info.run_id, "soft_prompt/soft_prompt.json")).read_text())
    assert meta["length"] == PROMPT_LENGTH and meta["format"] == "json" and meta["shape"] == [PROMPT_LENGTH, 576]
    checkpoints = [run for run in of_kind(runs, "checkpoint")
                   if tag(run, "method") == "promot" and tag(run, "format") == FORMAT]
    assert sorted(tag(run, "epoch") for run in checkpoints) == [str(epoch) for epoch in range(1, EPOCHS + 1)]
    for checkpoint in checkpoints:
        assert checkpoint.data.tags["mlflow.parentRunId"] == stages["2"].info.run_id


def test_promot_evaluations_without_and_with_the_prompt(promot_study):
    _, runs = promot_study
    checkpoints = {run.info.run_id for run in of_kind(runs, "checkpoint")
                   if tag(run, "method") == "promot" and tag(run, "format") == FORMAT}
    evaluations = [run for run in of_kind(runs, "evaluation") if run.data.tags["mlflow.parentRunId"] in checkpoints]
    with_prompt = [run for run in evaluations if tag(run, "soft_prompt") == "True"]
    without = [run for run in evaluations if tag(run, "soft_prompt") is None]
    assert len(with_prompt) + len(without) == len(evaluations)
    # at each checkpoint: harmful mix and XSTest unsafe (each judge), XSTest safe (the keyword judge's refusal
    # family) + wikihow json, once without and once with the soft prompt
    per_checkpoint = 2 * len(JUDGES) + 1 + 1
    assert len(without) == len(with_prompt) == per_checkpoint * len(checkpoints)
    for checkpoint in checkpoints:
        for group in (with_prompt, without):
            here = [run for run in group if run.data.tags["mlflow.parentRunId"] == checkpoint]
            task = [run for run in here if tag(run, "benchmark") == "wikihow"]
            assert len(task) == 1 and {"rouge_l", "sbert", "format_adherence"} <= set(task[0].data.metrics)
            assert tag(task[0], "format") == FORMAT
            safety = [run for run in here if tag(run, "benchmark") == "harmful_mix"]
            assert sorted(tag(run, "judge").split(":")[0] for run in safety) == sorted(JUDGES)
            for run in safety:
                assert "asr" in run.data.metrics
                assert tag(run, "judge_validation") == "none"  # no validation was logged in this store
    assert {run.data.params.get("soft_prompt") for run in with_prompt} == {"True"}
