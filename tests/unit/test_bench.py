"""`harness bench` on CPU with the tiny architecture: both tasks run and the JSON has the fields."""

import json

import pytest
import torch

from typer.testing import CliRunner

from harness.cli.main import app


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_generation_cli_writes_json(tmp_path):
    out = tmp_path / "gen.json"
    result = CliRunner().invoke(app, [
        "bench", "--prompts", "12", "--max-new-tokens", "16", "--batch", "4,8", "--decoding", "both",
        "--prompt-tokens", "4-12", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["task"] == "generation" and data["model"] == "tiny-llama" and data["device"] == "cpu"
    assert {(r["path"], r["decoding"], r["batch"]) for r in data["runs"]} == {
        (p, d, b) for p in ("plain", "harness") for d in ("greedy", "sampled") for b in (4, 8)
    }
    for run in data["runs"]:
        assert run["tokens"] > 0 and run["tokens_per_second"] > 0 and "peak_memory_gib" in run
    greedy = next(row for row in data["summary"] if row["decoding"] == "greedy")
    assert {"plain_tokens_per_second", "harness_tokens_per_second", "ratio"} <= set(greedy)
    assert greedy["greedy_identical"] == greedy["greedy_compared"] == 12  # float32: token for token
    assert "ratio" in result.output


def test_bench_training_cli_writes_json(tmp_path):
    out = tmp_path / "train.json"
    result = CliRunner().invoke(app, [
        "bench", "--task", "training", "--batch", "4", "--seq-len", "32", "--steps", "2", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["task"] == "training" and [r["path"] for r in data["runs"]] == ["plain", "harness"]
    summary = data["summary"][0]
    assert summary["ratio"] > 0 and summary["max_relative_loss_difference"] < 1e-3
    assert len(data["loss_curves"]["plain"]) == len(data["loss_curves"]["harness"]) == 4


def test_bench_rejects_bad_options():
    result = CliRunner().invoke(app, ["bench", "--task", "inference"])
    assert result.exit_code == 2 and "task must be generation or training" in result.output
