"""`harness sweep experiments/quickstart_sweep.yaml` through the real CLI on the packaged tiny model: the Optuna
study, the nested MLflow runs, the shared stage 1, the Pareto artifacts (checked against a front computed here,
independently), resuming without rerunning, and the sweep figure of `harness figures`.

The sweep runs once per module, in a folder no test touches; every test gets its own copy of that folder
(`swept`), so a test that reruns the sweep, adds a TPE trial or runs `harness run` on the store cannot change
what another test reads, whatever the order they run in."""

import copy
import csv
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from background import Job, harness
from helpers import fingerprint, of_kind, relocate, run_cli, tag

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "quickstart_sweep.yaml"
SETTINGS = yaml.safe_load(CONFIG.read_text())
GRID = sorted(SETTINGS["sweep"]["grid"]["train.learning_rate"])
NAME = SETTINGS["name"]


BACKGROUND_JOBS = [Job("pristine_sweep", lambda workdir: [harness("sweep", str(CONFIG))], readers=("sweep_once",))]


@pytest.fixture(scope="module")
def sweep_once(background):
    """The sweep, run once (in the background, tests/background.py) in a folder that tests only ever copy; with
    its output and its fingerprint."""
    workdir, (done,) = background.result("pristine_sweep")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done, fingerprint(workdir)


@pytest.fixture
def swept(sweep_once, tmp_path):
    """This test's own copy of the swept folder: (folder, CLI result, client, runs, Optuna study), all on the copy."""
    pristine, done, before = sweep_once
    assert fingerprint(pristine) == before, "an earlier test changed the shared sweep folder"
    workdir = tmp_path / "sweep"
    relocate(pristine, workdir)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    return workdir, done, client, runs, study


def parent(run):
    return run.data.tags.get("mlflow.parentRunId")


def non_dominated(points: dict) -> set:
    """The test's own Pareto set: no other point has ASR <= and S-BERT >= with one strictly better."""
    return {key for key, (asr, sbert) in points.items()
            if not any(a <= asr and s >= sbert and (a < asr or s > sbert) for a, s in points.values())}


def test_study_ran_exactly_the_grid(swept):
    _, done, _, runs, study = swept
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * len(GRID)
    assert sorted(t.params["train.learning_rate"] for t in trials) == GRID
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert "study complete" in done.stdout and "optuna-dashboard sqlite:///" in done.stdout
    trial_runs = {run.info.run_id: run for run in of_kind(runs, "trial")}
    for trial in trials:  # Optuna trial <-> MLflow run, both ways
        run = trial_runs[trial.user_attrs["mlflow_run_id"]]
        assert tag(run, "trial_number") == str(trial.number) and run.info.status == "FINISHED"
        assert float(run.data.params["optuna.train.learning_rate"]) == trial.params["train.learning_rate"]
        assert run.data.metrics["asr"] == trial.values[0] and run.data.metrics["sbert"] == trial.values[1]
        assert tag(run, "trial_state") == "COMPLETE"


def test_runs_nest_sweep_trial_finetune_and_stage1_is_shared(swept):
    _, _, _, runs, _ = swept
    (sweep,) = of_kind(runs, "sweep")
    assert sweep.info.status == "FINISHED"
    assert tag(sweep, "sampler") == "grid" and tag(sweep, "optuna_version") == optuna.__version__
    trials = of_kind(runs, "trial")
    assert {parent(run) for run in trials} == {sweep.info.run_id}
    (stage1,) = [run for run in of_kind(runs, "stage") if tag(run, "stage") == "1"]  # trained once for all trials
    assert parent(stage1) == sweep.info.run_id
    by_id = {run.info.run_id: run for run in runs}
    for finetune in [run for run in of_kind(runs, "finetune") if tag(run, "method") == "promot"]:
        assert tag(by_id[parent(finetune)], "kind") == "trial"
        assert tag(finetune, "prompt_source_run") == stage1.info.run_id
        assert tag(finetune, "format") == "prose"
    assert len([run for run in of_kind(runs, "finetune") if tag(run, "method") == "promot"]) == len(GRID)
    stage2 = [run for run in of_kind(runs, "stage") if tag(run, "stage") == "2"]
    assert all(tag(by_id[parent(run)], "kind") == "finetune" for run in stage2) and len(stage2) == len(GRID)
    checkpoints = of_kind(runs, "checkpoint")
    references = [run for run in checkpoints if parent(run) == sweep.info.run_id]
    assert [tag(run, "method") for run in references] == ["base"]
    (sft,) = [run for run in of_kind(runs, "finetune") if tag(run, "method") == "sft"]
    assert parent(sft) == sweep.info.run_id
    for run in of_kind(runs, "evaluation"):
        assert tag(by_id[parent(run)], "kind") == "checkpoint" and run.info.status == "FINISHED"


def test_trial_objectives_are_the_evaluations_values(swept):
    _, _, _, runs, _ = swept
    by_parent = {}
    for run in runs:
        by_parent.setdefault(parent(run), []).append(run)

    def below(run_id, kind):
        found, frontier = [], [run_id]
        while frontier:
            for child in by_parent.get(frontier.pop(), []):
                (found.append(child) if tag(child, "kind") == kind else None)
                frontier.append(child.info.run_id)
        return found

    for trial in of_kind(runs, "trial"):
        evaluations = below(trial.info.run_id, "evaluation")
        asr = [run.data.metrics["asr"] for run in evaluations if tag(run, "benchmark") == "harmful_mix"]
        sbert = [run.data.metrics["sbert"] for run in evaluations if tag(run, "benchmark") == "wikihow"]
        assert len(asr) == len(sbert) == 1  # one seed, one decoding setting, one judge, one epoch
        assert trial.data.metrics["asr"] == asr[0] and trial.data.metrics["sbert"] == sbert[0]
        assert trial.data.metrics["asr_std"] == 0 and trial.data.metrics["asr_n"] == 1


def test_pareto_artifacts_hold_exactly_the_non_dominated_trials(swept):
    _, _, client, runs, study = swept
    (sweep,) = of_kind(runs, "sweep")
    points = {int(tag(run, "trial_number")): (run.data.metrics["asr"], run.data.metrics["sbert"])
              for run in of_kind(runs, "trial")}
    expected = non_dominated(points)
    with open(client.download_artifacts(sweep.info.run_id, "pareto/pareto_front.csv")) as handle:
        front = list(csv.DictReader(handle))
    assert {int(row["trial"]) for row in front} == expected
    assert {t.number for t in study.best_trials} == expected
    for row in front:
        assert (float(row["asr"]), float(row["sbert"])) == points[int(row["trial"])]
    png = Path(client.download_artifacts(sweep.info.run_id, "pareto/pareto_front.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("base", "sft"):  # the reference points drawn on the plot
        assert 0 <= sweep.data.metrics[f"reference_{name}_asr"] <= 1 and 0 < sweep.data.metrics[f"reference_{name}_sbert"] <= 1


def test_rerun_continues_the_study_without_rerunning_trials(swept):
    workdir, _, client, runs, study = swept
    done = run_cli(["sweep", str(CONFIG)], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [line for line in done.stdout.splitlines() if line.startswith("trial ")]  # no trial started
    again = [run for run in client.search_runs([runs[0].info.experiment_id], max_results=1000)
             if tag(run, "kind") != "report"]  # `harness figures` above logged its report run
    assert sorted(run.info.run_id for run in again) == sorted(run.info.run_id for run in runs)
    assert len(optuna.load_study(study_name=NAME, storage=study._storage).get_trials()) == len(GRID)


def test_figures_draws_the_sweep_pareto_plot(swept):
    workdir, _, _, runs, _ = swept
    out = workdir / "figures"
    done = run_cli(["figures", "--study", NAME, "--out", str(out), "--tracking-uri",
                    f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"sweep_pareto_{NAME}.png").is_file()
    with open(out / f"sweep_pareto_{NAME}.csv") as handle:
        rows = list(csv.DictReader(handle))
    points = {int(tag(run, "trial_number")): (run.data.metrics["asr"], run.data.metrics["sbert"])
              for run in of_kind(runs, "trial")}
    assert {int(row["trial"]) for row in rows if row["pareto"] == "True"} == non_dominated(points)
    assert f"sweep_pareto_{NAME}.png" in (out / "report.md").read_text()


def fig3_rows(out: Path) -> list[dict]:
    with open(out / "fig3_asr.csv") as handle:
        return list(csv.DictReader(handle))


def test_study_figures_leave_trials_out_until_harness_run_reuses_one(swept):
    """A trial's fine-tune at its sampled LR is not an arm of the study: Fig. 3 shows only the reference points.
    `harness run` on the same settings at one grid LR then trains nothing (every unit is FINISHED, whatever
    the order of train.methods) and that trial's ProMoT becomes the study's ProMoT arm, and only that one."""
    workdir, _, client, runs, _ = swept
    store = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    before = run_cli(["figures", "--study", NAME, "--out", str(workdir / "before"), "--tracking-uri", store], cwd=workdir)
    assert before.returncode == 0, before.stderr[-3000:]
    assert {row["method"] for row in fig3_rows(workdir / "before")} == {"base", "sft"}
    assert "of sweep trials left to the sweep figure" in (workdir / "before" / "report.md").read_text()

    study = {key: value for key, value in SETTINGS.items() if key != "sweep"}
    study["train"] = {**study["train"], "methods": ["sft", "promot"]}  # the sweep itself sets [promot, sft]
    assert study["train"]["learning_rate"] in GRID
    config = workdir / "study_at_one_lr.yaml"
    config.write_text(yaml.safe_dump(study))
    done = run_cli(["run", str(config)], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    again = [run for run in client.search_runs([runs[0].info.experiment_id], max_results=1000)
             if tag(run, "kind") != "report"]  # `harness figures` above logged its report run
    assert sorted(run.info.run_id for run in again) == sorted(run.info.run_id for run in runs)  # nothing new
    reused = [run for run in of_kind(again, "finetune") if tag(run, "study_arm") == "True"]
    assert [(tag(run, "method"), float(run.data.params["train.learning_rate"])) for run in reused] == [
        ("promot", study["train"]["learning_rate"])]

    after = run_cli(["figures", "--study", NAME, "--out", str(workdir / "after"), "--tracking-uri", store], cwd=workdir)
    assert after.returncode == 0, after.stderr[-3000:]
    promot = [row for row in fig3_rows(workdir / "after") if row["method"] == "promot"]
    below_reused, frontier = set(), [reused[0].info.run_id]
    while frontier:
        run_id = frontier.pop()
        below_reused.add(run_id)
        frontier += [run.info.run_id for run in again if parent(run) == run_id]
    assert promot and {row["run_id"] for row in promot} <= below_reused
    assert len(promot) == len(SETTINGS["seeds"])  # one LR's arm, not one point per trial


def test_a_tpe_sweep_continues_the_grid_study(swept):
    """What Optuna adds after a grid: the same study (name, settings, objectives) continued by TPE, modelling the
    front from the grid's points at once (`startup_trials`), one more trial in the grid's range, same sweep run."""
    workdir, _, client, runs, study = swept
    settings = copy.deepcopy(SETTINGS)
    settings["sweep"] = {**{key: value for key, value in SETTINGS["sweep"].items() if key != "grid"},
                         "sampler": "tpe", "space": {"train.learning_rate": {"low": GRID[0], "high": GRID[-1], "log": True}},
                         "startup_trials": len(GRID), "n_trials": len(GRID) + 1}
    config = workdir / "tpe.yaml"
    config.write_text(yaml.safe_dump(settings))
    done = run_cli(["sweep", str(config)], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name=NAME, storage=study._storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * (len(GRID) + 1)
    added = trials[-1].params["train.learning_rate"]
    assert GRID[0] <= added <= GRID[-1] and added not in GRID
    again = client.search_runs([runs[0].info.experiment_id], max_results=1000)
    [sweep_run] = of_kind(again, "sweep")
    assert tag(sweep_run, "sampler") == "tpe" and sweep_run.info.status == "FINISHED"
    [new_trial] = [run for run in of_kind(again, "trial") if tag(run, "trial_number") == str(trials[-1].number)]
    assert parent(new_trial) == sweep_run.info.run_id
    assert float(new_trial.data.params["optuna.train.learning_rate"]) == added
    assert len([run for run in of_kind(again, "stage") if tag(run, "stage") == "1"]) == 1  # stage 1 reused again
