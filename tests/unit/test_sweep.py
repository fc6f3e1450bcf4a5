"""The sweep without a model (seconds): config errors and the Pareto front. The worker loop on a real SQLite
Optuna storage with real worker processes is in tests/e2e/test_sweep_workers.py; the model-backed runs are in
tests/e2e/test_sweep_e2e.py and tests/e2e/test_sweep_postgres.py."""

import copy
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.analysis.figures_sweep import pareto_mask
from harness.sweep.search import (
    SweepConfig, apply_params, effective_trials, load_sweep, parse_sweep, redact, storage_url,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "name": "unit-sweep",
    "model": "smollm2-135m-instruct",
    "data": {"formats": ["prose"]},
    "sweep": {"sampler": "grid", "grid": {"train.learning_rate": [5.0e-5, 1.0e-4, 2.0e-4]}},
}


def with_changes(**changes) -> dict:
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def test_grid_sweep_parses_and_sets_methods():
    cfg, sweep = parse_sweep(BASE)
    assert sweep.trials == 3 and sweep.params == ["train.learning_rate"]
    assert cfg.train.methods == ["promot", "sft"]  # the searched method, then SFT for the reference point


@pytest.mark.parametrize("data, expected", [
    ({k: v for k, v in BASE.items() if k != "sweep"}, "sweep: required section missing"),
    (with_changes(sweep__sampler="annealing"), "sweep.sampler"),
    (with_changes(sweep__grid=None), "sweep.(top level)"),
    (with_changes(sweep__sampler="tpe"), "needs 'space'"),
    (with_changes(sweep__n_trials=4), "exceeds the grid's 3 points"),
    (with_changes(sweep__grid={"model": ["x"]}), "cannot search 'model'"),
    (with_changes(sweep__grid={"train.methods": ["sft"]}), "cannot search 'train.methods'"),
    (with_changes(sweep__grid={"train.lerning_rate": [1.0e-4]}), "sweep.grid.train.lerning_rate: 'train.lerning_rate' is not a config field"),
    (with_changes(sweep__grid={"train.learning_rate": [-1.0]}), "sweep.grid.train.learning_rate: train.learning_rate"),
    (with_changes(sweep__format="json"), "sweep.format: 'json' is not in data.formats"),
    (with_changes(sweep__judge="llm"), "sweep.judge: 'llm' is not in eval.judges"),
    (with_changes(sweep__colour="red"), "sweep.colour: unknown key"),
    (with_changes(train__methods=["sft"]), "train.methods: set by the sweep"),
    (with_changes(sweep__sampler="tpe", sweep__grid=None,
                  sweep__space={"train.learning_rate": {"low": 0.0, "high": 1.0e-3, "log": True}}), "log range needs low > 0"),
], ids=["no-sweep", "sampler", "grid-missing", "tpe-without-space", "too-many-trials", "not-train", "methods",
        "misspelled-param", "invalid-value", "format", "judge", "unknown-key", "train-methods", "log-zero"])
def test_bad_sweep_config_is_one_line_naming_the_field(data, expected):
    with pytest.raises(HarnessError) as error:
        parse_sweep(data, "s.yaml")
    message = str(error.value)
    assert expected in message and "\n" not in message and message.startswith("s.yaml: ")


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("5.0e-05", "5e-5"))
    assert "5e-5" in path.read_text()
    _, sweep = load_sweep(path)
    assert sweep.grid["train.learning_rate"][0] == 5e-5


def test_space_sampler_and_apply_params():
    cfg, sweep = parse_sweep(with_changes(sweep__sampler="nsga2", sweep__grid=None, sweep__n_trials=6, sweep__space={
        "train.learning_rate": {"low": 5.0e-5, "high": 5.0e-4, "log": True}, "train.lora.r": {"low": 4, "high": 16, "integer": True}}))
    assert sweep.trials == 6
    trial_cfg = apply_params(cfg, {"train.learning_rate": 2e-4, "train.lora.r": 8})
    assert trial_cfg.train.learning_rate == 2e-4 and trial_cfg.train.lora.r == 8 and cfg.train.lora.r == 16


def test_startup_trials_only_for_model_based_samplers():
    space = {"train.learning_rate": {"low": 5.0e-5, "high": 5.0e-4, "log": True}}
    _, sweep = parse_sweep(with_changes(sweep__sampler="tpe", sweep__grid=None, sweep__space=space, sweep__startup_trials=3))
    assert sweep.startup_trials == 3
    for sampler, grid, space_ in (("grid", BASE["sweep"]["grid"], None), ("nsga2", None, space)):
        with pytest.raises(HarnessError, match="startup_trials: only for samplers 'tpe' and 'gp'"):
            parse_sweep(with_changes(sweep__sampler=sampler, sweep__grid=grid, sweep__space=space_, sweep__startup_trials=3))


def test_shipped_sweep_configs_validate():
    for name in ("quickstart_sweep.yaml", "promot_lr_sweep.yaml"):
        cfg, sweep = load_sweep(ROOT / "experiments" / name)
        assert sweep.sampler == "grid" and sweep.method == "promot" and sweep.format == "prose"
    cfg, sweep = load_sweep(ROOT / "experiments" / "promot_lr_sweep.yaml")
    assert sweep.grid == {"train.learning_rate": [5e-5, 1e-4, 2e-4, 3e-4, 5e-4]}  # Table 2's five
    assert cfg.model == "meta-llama/Llama-3.1-8B-Instruct" and cfg.train.quantize_4bit


def test_storage_defaults_beside_the_mlflow_store_and_redacts(tmp_path):
    sweep = SweepConfig(sampler="grid", grid={"train.learning_rate": [1e-4]})
    url = storage_url(sweep, f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert url == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert redact("postgresql+psycopg://alice:s3cr3t@db:5432/optuna") == "postgresql+psycopg://alice:***@db:5432/optuna"
    assert "s3cr3t" not in redact("postgresql://alice:s3cr3t@db/optuna")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.sampled_from([0.2, 0.8, 0.9])), max_size=8))
def test_pareto_mask_keeps_exactly_the_non_dominated(points):
    mask = pareto_mask(points)
    for point, kept in zip(points, mask):
        beaten = any(o[0] <= point[0] and o[1] >= point[1] and o != point for o in points)
        assert kept == (not beaten)


def test_effective_trials_drop_those_replaced_by_a_retry():
    trials = [optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, system_attrs={}),
              optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs={"retry_history": [0]})]
    for number, trial in enumerate(trials):
        trial.number = number
    assert [t.number for t in effective_trials(trials)] == [1]


def test_pareto_labels_of_points_too_close_to_tell_apart_are_joined():
    from harness.analysis.figures_sweep import label_groups

    rows = [{"trial": 0, "asr": 0.249, "sbert": 0.6338, "lr": 2e-4}, {"trial": 6, "asr": 0.247, "sbert": 0.6336, "lr": 1.84e-4},
            {"trial": 5, "asr": 0.296, "sbert": 0.6454, "lr": 5e-4}, {"trial": 1, "asr": 0.242, "sbert": 0.6144, "lr": 5e-5}]
    groups = label_groups(rows, {"sft": (0.625, 0.602)}, "lr")
    assert sorted(names for _, names in groups) == [["#1 (5e-05)"], ["#5 (0.0005)"], ["#6 (0.00018)", "#0 (0.0002)"]]
    assert label_groups(rows[:1] * 1, {}, None) == [((0.249, 0.6338), ["#0"])]  # one point: no span, no error
