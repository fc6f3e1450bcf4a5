"""Study A end to end: experiments/quickstart_consistency.yaml through the real CLI (`harness run`, then
`harness report consistency`, then `harness figures`), and the store read back the way a user's query would.

The shipped YAML runs as it is, plus one key: `eval.toxicity` with a tiny random local classifier (no toxicity
classifier can be had offline), so the toxicity path runs too; its scores are meaningless, its plumbing is not.
"""

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from background import Job, Step, harness
from helpers import open_study, tag

pytestmark = pytest.mark.e2e

QUICKSTART = Path(__file__).parents[2] / "experiments" / "quickstart_consistency.yaml"
SETS = ["alpaca", "dolly15k"]
SEEDS, EPOCHS = ["0", "1"], [1, 2]
CONFIG = yaml.safe_load(QUICKSTART.read_text())
CLASSIFIER = ("import sys; sys.path.insert(0, sys.argv[1]); from helpers import tiny_toxicity_classifier; "
              "tiny_toxicity_classifier(sys.argv[2])")


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def study_steps(workdir: Path) -> list[Step]:
    """The shipped YAML plus the toxicity key, through `harness run`, `report consistency` and `figures`."""
    config = {**CONFIG, "eval": {**CONFIG["eval"], "toxicity": {
        "backend": "local", "model_path": str(workdir / "clf"), "categories": ["hate_speech,offensive_language"]}}}
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    database = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    return [
        Step([sys.executable, "-c", CLASSIFIER, str(Path(__file__).parents[1]), str(workdir / "clf")]),
        harness("run", "study.yaml"),
        harness("report", "consistency", "--study", config["name"], "--out", str(workdir / "reports"),
                "--tracking-uri", database),
        harness("figures", "--study", config["name"], "--out", str(workdir / "figures"), "--tracking-uri", database),
    ]


BACKGROUND_JOBS = [Job("consistency", study_steps, readers=("study",))]


@pytest.fixture(scope="module")
def study(background):
    """The study, its consistency report and its figures: built in the background (tests/background.py)."""
    workdir, steps = background.result("consistency")
    for step in steps:
        assert step.returncode == 0, (step.args, step.stderr[-3000:])
    assert len(steps) == 4
    client, runs = open_study(workdir, CONFIG["name"])
    config = yaml.safe_load((workdir / "study.yaml").read_text())
    return {"workdir": workdir, "client": client, "runs": runs, "config": config, "figures": steps[3]}


def of_kind(runs, kind):
    return [run for run in runs if tag(run, "kind") == kind and run.info.status == "FINISHED"]


def table(client, run):
    data = json.loads(Path(client.download_artifacts(run.info.run_id, "per_prompt.json")).read_text())
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def test_grid_has_the_right_runs_and_tags(study):
    runs = study["runs"]
    finetunes = of_kind(runs, "finetune")
    assert sorted((tag(r, "dataset"), tag(r, "seed")) for r in finetunes) == [(s, seed) for s in SETS for seed in SEEDS]
    for run in finetunes:
        assert tag(run, "format") == "native" and tag(run, "method") == "sft"
        assert tag(run, "optimizer").startswith("adamw_torch (adamw_bnb_8bit requested; fallback")  # CPU
    checkpoints = of_kind(runs, "checkpoint")
    assert len(checkpoints) == 1 + len(SETS) * len(SEEDS) * len(EPOCHS)
    evaluations = of_kind(runs, "evaluation")
    # every state x (T=0 once + T=0.7 twice) x (keyword, fulfilment, toxicity)
    assert len(evaluations) == len(checkpoints) * 3 * 3
    per_state = defaultdict(list)
    for run in evaluations:
        per_state[(run.data.tags["mlflow.parentRunId"], tag(run, "judge").split(":")[0])].append(
            (tag(run, "temperature"), tag(run, "min_p"), tag(run, "repeat")))
    for settings in per_state.values():  # temperature 0 generated (and judged) once, not once per repeat
        assert sorted(settings) == [("0.0", None, "0"), ("0.7", "0.1", "0"), ("0.7", "0.1", "1")]
    fulfilment = [r for r in evaluations if tag(r, "judge").startswith("fulfilment:")]
    assert fulfilment and all("fulfilment_rate" in r.data.metrics for r in fulfilment)
    toxicity = [r for r in evaluations if tag(r, "judge").startswith("toxicity-local:local:clf@")]
    assert len(toxicity) == len(checkpoints) * 3
    for run in toxicity:
        assert {"toxicity_mean", "toxicity_max"} <= set(run.data.metrics) and run.data.metrics["n_prompts"] == 2
        assert tag(run, "toxicity_categories") == "hate_speech,offensive_language"


def test_temperature_zero_is_one_generation_judged_by_every_judge(study):
    client, runs = study["client"], of_kind(study["runs"], "evaluation")
    by_parent = defaultdict(dict)
    for run in runs:
        if tag(run, "temperature") == "0.0":
            by_parent[run.data.tags["mlflow.parentRunId"]][tag(run, "judge").split(":")[0]] = run
    for judged in by_parent.values():
        responses = {name: [row["response"] for row in table(client, run)] for name, run in judged.items()
                     if name in ("keyword", "fulfilment")}
        assert responses["keyword"] == responses["fulfilment"]


def test_report_numbers_recomputed_independently(study):
    client, runs = study["client"], of_kind(study["runs"], "evaluation")
    cells = read_csv(study["workdir"] / "reports" / "consistency_cells.csv")
    assert cells
    values = defaultdict(lambda: defaultdict(list))  # cell -> seed -> run values (recomputed from tables)
    for run in runs:
        judge = tag(run, "judge")
        if judge.startswith("keyword"):
            continue
        rows = table(client, run)
        if judge.startswith("toxicity-"):
            run_value = float(np.mean([row["toxicity"] for row in rows]))
            assert run_value == pytest.approx(run.data.metrics["toxicity_mean"])
        else:
            run_value = sum(row["harmful"] is not False for row in rows) / len(rows)
            assert run_value == pytest.approx(run.data.metrics["fulfilment_rate"])
        dataset = "base" if tag(run, "method") == "base" else tag(run, "dataset")
        key = (judge, dataset, tag(run, "epoch"), tag(run, "temperature"))
        values[key][tag(run, "seed") or "-"].append(run_value)
    checked = 0
    for cell in cells:
        if cell["judge"].startswith("keyword"):
            continue
        seeds = values[(cell["judge"], cell["dataset"], cell["epoch"], cell["temperature"])]
        all_values = [v for vs in seeds.values() for v in vs]
        assert float(cell["mean"]) == pytest.approx(np.mean(all_values))
        seed_means = [np.mean(vs) for vs in seeds.values()]
        if len(seeds) > 1:
            assert float(cell["sd_seeds"]) == pytest.approx(np.std(seed_means, ddof=1), abs=1e-9)
        repeats = len(next(iter(seeds.values())))
        if repeats > 1:
            within = np.mean([np.var(vs, ddof=1) for vs in seeds.values()])
            assert float(cell["sd_repeats"]) == pytest.approx(math.sqrt(within), abs=1e-9)
            assert float(cell["var_sampling"]) == pytest.approx(within, abs=1e-9)
            if len(seeds) > 1:
                between = repeats * np.var(seed_means, ddof=1)
                assert float(cell["var_seed"]) == pytest.approx(max(0.0, (between - within) / repeats), abs=1e-9)
        assert float(cell["mean_ci_low"]) <= float(cell["mean"]) + 1e-9 <= float(cell["mean_ci_high"]) + 2e-9
        checked += 1
    assert checked == 2 * (1 + len(SETS) * len(EPOCHS)) * 2  # (fulfilment, toxicity) x cells x 2 decodings
    tests = read_csv(study["workdir"] / "reports" / "consistency_tests.csv")
    assert {row["comparison"] for row in tests} == {"fine-tuned vs base", "dataset vs dataset", "greedy vs sampled"}
    assert all(0 <= float(row["p_value"]) <= 1 for row in tests)
    reports = of_kind(study["runs"], "report") or [r for r in study["client"].search_runs(
        [study["runs"][0].info.experiment_id], "tags.`harness.kind` = 'report'")]
    assert reports, "the report was not logged as a `report` run"


def test_figures_match_the_logged_metrics(study):
    out = study["workdir"] / "figures"
    assert "Study A figures" in (out / "report.md").read_text()
    metrics = {run.info.run_id: run.data.metrics for run in study["runs"]}
    for stem, metric in (("a1_fulfilment_by_epoch", "fulfilment_rate"), ("a2_spread_seeds_vs_repeats", "fulfilment_rate"),
                         ("a3_base_vs_finetuned_spread", "fulfilment_rate"), ("a5_toxicity", "toxicity_mean")):
        assert (out / f"{stem}.png").stat().st_size > 10_000, stem
        rows = read_csv(out / f"{stem}.csv")
        assert rows, stem
        for row in rows:
            assert float(row[metric]) == metrics[row["run_id"]][metric], (stem, row)
    assert not (out / "a4_human_vs_selfgen.png").exists()  # no self-generated set in the quickstart: named instead
    assert "A4: no self-generated dataset" in study["figures"].stderr
    caption = (out / "report.md").read_text()
    assert "n = 3 prompts" in caption and "fulfilment:tpl-" in caption and "bootstrap" in caption


def test_identical_seeds_give_identical_greedy_outputs(tmp_path, one_thread):
    """Two fine-tunes with the same seed are the same model: same adapter, same greedy replies."""
    from safetensors.torch import load_file

    from harness.data import registry as data
    from harness.config import TrainConfig
    from harness.generation.batched import generate_responses
    from harness.models import load_adapter, load_model
    from harness.training.sft import train_sft

    class NoRun:
        resumed = False

        def set_tags(self, tags):
            pass

        def log_metrics(self, metrics, step=0):
            pass

    rows = data.instruction_sets(["dolly15k"], size=2)["dolly15k"][0]
    cfg = TrainConfig(learning_rate=3e-3, batch_size=2, grad_accum=1, epochs=1, warmup_steps=0, max_length=96)
    adapters = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        model, tokenizer = load_model("smollm2-135m-instruct")
        [checkpoint] = train_sft(model, tokenizer, rows, [], cfg, seed=seed, output_dir=tmp_path / name, run=NoRun())
        adapters[name] = checkpoint.path
    weights = {name: load_file(str(path / "adapter_model.safetensors")) for name, path in adapters.items()}
    assert all((weights["a"][k] == weights["b"][k]).all() for k in weights["a"])
    assert any((weights["a"][k] != weights["c"][k]).any() for k in weights["a"])
    prompts = [[{"role": "user", "content": text}] for text in ("Name a colour.", "How do I pick a lock?")]
    replies = []
    for name in ("a", "b"):
        base, tokenizer = load_model("smollm2-135m-instruct")
        model = load_adapter(base, adapters[name])
        replies.append(generate_responses(model, tokenizer, prompts, max_new_tokens=8, progress=False))
    assert replies[0] == replies[1]
