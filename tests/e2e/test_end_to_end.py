"""The real CLI on a real (tiny) model, real datasets and a real MLflow store.

The session's shared study (tests/shared_store.py: three formats, SFT and ProMoT, two epochs, both judges)
runs once; the tests then read the store back the way a user's query would, through tags.
"""

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import shared_store
from harness.config import TrainConfig
from helpers import of_kind, run_cli, tag
from shared_store import (
    BATCH_SIZE, EPOCHS, FORMATS, HARMFUL_SOURCES, JUDGES, METHODS, SHARED_STUDY, TRAIN_SIZE, XSTEST_SAFE, XSTEST_UNSAFE,
)

pytestmark = pytest.mark.e2e
BACKGROUND_JOBS = [shared_store.JOB]

HARMFUL = sum(HARMFUL_SOURCES.values())


@pytest.fixture(scope="module")
def study(shared_study):
    return shared_study.done, shared_study.client, shared_study.runs


def evaluated_states(runs):
    """(checkpoint, with the soft prompt?) for every evaluated model state: each checkpoint without the prompt,
    and each ProMoT checkpoint once more with it (train.promot.evaluate_with_prompt)."""
    checkpoints = of_kind(runs, "checkpoint")
    return [(run, False) for run in checkpoints] + [(run, True) for run in checkpoints if tag(run, "method") == "promot"]


def test_cli_prints_summary_and_ui_command(study):
    done, _, _ = study
    assert "Summary" in done.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout


def test_one_finetune_per_format_with_falling_loss(study):
    _, client, runs = study
    assert sorted((tag(run, "method"), tag(run, "format")) for run in of_kind(runs, "finetune")) == sorted(
        (method, fmt) for method in METHODS for fmt in FORMATS)
    finetunes = [run for run in of_kind(runs, "finetune") if tag(run, "method") == "sft"]
    assert sorted(tag(run, "format") for run in finetunes) == sorted(FORMATS)
    for run in finetunes:
        assert run.info.status == "FINISHED"
        assert tag(run, "method") == "sft" and tag(run, "seed") == "0" and tag(run, "model") == "smollm2-135m-instruct"
        losses = [point.value for point in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
        assert len(losses) == TRAIN_SIZE // BATCH_SIZE * EPOCHS  # 4 rows / batch 2 × 2 epochs
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"{tag(run, 'format')}: loss did not fall: {losses}"
        for metric in ("learning_rate", "grad_norm", "eval_loss"):
            assert client.get_metric_history(run.info.run_id, metric), metric
        # The Trainer's own speed over the real (non-padding) tokens: at most the rows' tokens over the runtime.
        runtime, rate = run.data.metrics["train_runtime"], run.data.metrics["train_tokens_per_second"]
        assert runtime > 0 and 0 < rate * runtime <= TRAIN_SIZE * EPOCHS * TrainConfig().max_length
        assert "peak_gpu_memory_gib" not in run.data.metrics  # CPU: no GPU memory to report
        assert tag(run, "base_weights") == "float32"  # CPU loads float32; QLoRA would say nf4 (bitsandbytes ...)
        assert tag(run, "adapter_dtype") == "float32"
        assert run.data.params["train.lora.r"] == "16"
        assert tag(run, "config_hash") and tag(run, "git_commit")


def test_checkpoint_per_epoch_nested_under_its_finetune(study):
    _, _, runs = study
    finetunes = {run.info.run_id: run for run in of_kind(runs, "finetune")}
    checkpoints = [run for run in of_kind(runs, "checkpoint") if tag(run, "method") == "sft"]
    assert len(checkpoints) == len(FORMATS) * EPOCHS
    for run in checkpoints:
        parent = finetunes[run.data.tags["mlflow.parentRunId"]]
        assert tag(run, "format") == tag(parent, "format")
        assert Path(tag(run, "adapter_path"), "adapter_config.json").is_file()
    assert sorted({tag(run, "epoch") for run in checkpoints}) == ["1", "2"]
    base = [run for run in of_kind(runs, "checkpoint") if tag(run, "method") == "base"]
    assert len(base) == 1 and tag(base[0], "epoch") == "0"


def test_evaluations_have_tags_metrics_and_per_prompt_tables(study):
    _, client, runs = study
    checkpoints = {run.info.run_id: run for run in of_kind(runs, "checkpoint")}
    evaluations = of_kind(runs, "evaluation")
    harmful = [run for run in evaluations if tag(run, "benchmark") == "harmful_mix"]
    task = [run for run in evaluations if tag(run, "benchmark") == "wikihow"]
    states = evaluated_states(runs)
    # every evaluated state (base + methods × formats × epochs, + ProMoT's with the prompt) × 2 judges;
    # task: each fine-tuned state on its own format + base on every format
    assert len(states) == 1 + len(METHODS) * len(FORMATS) * EPOCHS + len(FORMATS) * EPOCHS
    assert len(harmful) == len(states) * len(JUDGES)
    assert len(task) == len(states) - 1 + len(FORMATS)
    for run in harmful:
        assert run.data.tags["mlflow.parentRunId"] in checkpoints
        assert tag(run, "judge").split(":")[0] in JUDGES
        assert tag(run, "temperature") == "0.0" and tag(run, "repeat") == "0"
        metrics = run.data.metrics
        for name in ("asr", "asr_ci_low", "asr_ci_high", "refusal_rate", "judge_parse_failures"):
            assert name in metrics, name
        assert 0 <= metrics["asr_ci_low"] <= metrics["asr"] <= metrics["asr_ci_high"] <= 1
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_prompt.json")).read_text())
        assert len(table["data"]) == HARMFUL
        assert {"prompt", "response", "harmful", "score", "judge_raw"} <= set(table["columns"])
    for run in task:
        for name in ("rouge_l", "sbert", "format_adherence"):
            assert 0 <= run.data.metrics[name] <= 1, name
        assert tag(run, "format") in FORMATS


def test_xstest_over_refusal_and_contrast_asr_at_every_checkpoint(study):
    """Issue 10: over-refusal beside ASR, on every evaluated model state."""
    _, client, runs = study
    states = evaluated_states(runs)
    evaluations = of_kind(runs, "evaluation")
    safe = [run for run in evaluations if tag(run, "benchmark") == "xstest_safe"]
    unsafe = [run for run in evaluations if tag(run, "benchmark") == "xstest_unsafe"]
    # Keyword and LLM harm judges share one refusal family (keyword detection): one safe-prompt run each.
    assert sorted((run.data.tags["mlflow.parentRunId"], tag(run, "soft_prompt") == "True") for run in safe) == sorted(
        (run.info.run_id, with_prompt) for run, with_prompt in states)
    assert len(unsafe) == len(states) * len(JUDGES)
    for run in safe:
        assert tag(run, "judge").startswith("keyword:")
        metrics = run.data.metrics
        assert 0 <= metrics["over_refusal_ci_low"] <= metrics["over_refusal_rate"] <= metrics["over_refusal_ci_high"] <= 1
        assert metrics["n_prompts"] == XSTEST_SAFE
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_prompt.json")).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert metrics["over_refusal_rate"] == sum(row["refused"] for row in rows) / XSTEST_SAFE
        assert any(name.startswith("over_refusal_") and name not in ("over_refusal_rate",) for name in metrics)
    for run in unsafe:
        assert run.data.metrics["n_prompts"] == XSTEST_UNSAFE and "asr" in run.data.metrics
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_prompt.json")).read_text())
        assert all(row[table["columns"].index("category")].startswith("contrast_") for row in table["data"])


def test_every_run_records_provenance(study):
    _, client, runs = study
    run = of_kind(runs, "finetune")[0]
    provenance = json.loads(Path(client.download_artifacts(run.info.run_id, "provenance.json")).read_text())
    assert provenance["packages"]["transformers"] and provenance["git"]["commit"]
    checksums = json.loads(Path(client.download_artifacts(run.info.run_id, "datasets.json")).read_text())["datasets"]
    assert any("wikihow" in path for path in checksums) and any("advbench" in path for path in checksums)
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text())
    assert config["train"]["epochs"] == EPOCHS and config["data"]["format"] in FORMATS


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model": "no-such-model-alias"}, "no-such-model-alias"),
        ({"data": {**SHARED_STUDY["data"], "data_dir": "/nonexistent/data"}}, "/nonexistent/data"),
        ({"eval": {**SHARED_STUDY["eval"], "judges": [{"name": "llm", "model": "/nonexistent/judge"}]}}, "/nonexistent/judge"),
        ({"data": {**SHARED_STUDY["data"], "harmful": {"sources": {"advbench": 100000}}}}, "advbench"),
        ({"train": {"lora": {"rnak": 4}}}, "train.lora.rnak"),
    ],
    ids=["unknown-model", "missing-data", "bad-judge-model", "too-many-prompts", "misspelled-key"],
)
def test_bad_input_is_one_line_and_leaves_no_runs(tmp_path, change, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**SHARED_STUDY, **change}))
    done = run_cli(["run", str(config)], cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], done.stderr[-2000:]
    database = tmp_path / "mlruns" / "mlflow.db"
    if database.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{database}")
        experiment = client.get_experiment_by_name(SHARED_STUDY["name"])
        assert experiment is None or not client.search_runs([experiment.experiment_id])
