"""The experiment config: paper defaults, one-line errors that name the bad field, shipped YAMLs resolve."""

from pathlib import Path

import pytest
import yaml

from harness.config import ExperimentConfig, config_hash, load_config, parse_config
from harness.errors import HarnessError

from helpers import nested_models

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_study_b_table_3():
    cfg = parse_config({"name": "x", "model": "smollm2-135m-instruct"})
    train = cfg.train
    assert (train.learning_rate, train.lr_scheduler, train.warmup_steps) == (5e-5, "cosine", 5)
    assert (train.batch_size, train.grad_accum, train.epochs) == (16, 2, 2)
    assert (train.lora.r, train.lora.alpha, train.lora.dropout, train.lora.target_modules) == (16, 16, 0.01, "all-linear")
    assert (cfg.data.train_size, cfg.data.val_size, cfg.data.test_size) == (1425, 75, 100)
    assert sum(cfg.data.harmful.sources.values()) == 1320
    assert cfg.data.formats == ["prose", "list", "json"]
    assert cfg.eval.decoding[0].temperature == 0
    assert cfg.eval.judges[0].name == "keyword"


def walk_fields(model_cls, path=""):
    """(dotted path, FieldInfo) of every field of `model_cls` and of every model nested in it, at any depth."""
    for name, info in model_cls.model_fields.items():
        yield f"{path}{name}", info
        for nested in nested_models(info.annotation):
            yield from walk_fields(nested, f"{path}{name}.")


def test_every_field_has_a_docstring():
    from harness.sweep.search import SweepConfig

    visited = set()
    for root in (ExperimentConfig, SweepConfig):
        for path, info in walk_fields(root):
            visited.add(path)
            assert info.description, f"{path} has no docstring"
    # the walk reaches models behind lists, optionals and dict values, not just plain nested sections
    for path in ("eval.decoding.temperature", "eval.judges.threshold", "eval.xstest.safe", "eval.toxicity.backend",
                 "data.finetune.selfgen.decoding.top_p", "space.low"):
        assert path in visited, path


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"name": "x", "model": "m", "train": {"lora": {"rnak": 8}}}, "train.lora.rnak: unknown key"),
        ({"name": "x", "model": "m", "trian": {}}, "trian: unknown key"),
        ({"name": "x", "model": "m", "train": {"learning_rate": "fast"}}, "train.learning_rate"),
        ({"name": "x", "model": "m", "train": {"epochs": 0}}, "train.epochs"),
        ({"name": "x"}, "model: required field missing"),
        ({"name": "x", "model": "m", "data": {"formats": ["yaml"]}}, "data.formats.0"),
        ({"name": "x", "model": "m", "data": {"harmful": {"sources": {}}}}, "empty prompt set"),
        ({"name": "x", "model": "m", "eval": {"judges": [{"name": "llm"}]}}, "eval.judges.0"),
        ({"name": "x", "model": "m", "eval": {"decoding": [{"temperature": 0, "repeats": 3}]}}, "repeats must be 1"),
        ({"name": "x", "model": "m", "seeds": []}, "seeds"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, data, expected):
    with pytest.raises(HarnessError) as error:
        load_config(write(tmp_path, data))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert str(tmp_path / "exp.yaml") in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(HarnessError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(HarnessError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(HarnessError, match="mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))


def test_config_hash_is_stable_and_sensitive():
    a = parse_config({"name": "x", "model": "m"}).resolved()
    b = parse_config({"name": "x", "model": "m", "train": {"learning_rate": 5e-5}}).resolved()
    c = parse_config({"name": "x", "model": "m", "train": {"learning_rate": 1e-4}}).resolved()
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert len(config_hash(a)) == 16


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_load_and_start_with_their_command(path):
    cfg = load_shipped(path)
    sweep = "sweep" in yaml.safe_load(path.read_text())
    # A sweep may join the study of a shipped `harness run` config (same name) to share its units.
    assert cfg.name == path.stem or (sweep and (EXPERIMENTS / f"{cfg.name}.yaml").is_file())
    command = "sweep" if "sweep" in yaml.safe_load(path.read_text()) else "run"
    assert path.read_text().splitlines()[0] == f"# harness {command} experiments/{path.name}"


def test_a_sweep_sharing_a_study_has_the_studys_settings():
    """Units are shared by hash: a sweep that joins a study with other data, model or training settings would
    silently retrain everything, so every setting but the method list (which the sweep sets) must match."""
    shared = [path for path in sorted(EXPERIMENTS.glob("*.yaml")) if "sweep" in yaml.safe_load(path.read_text())
              and load_shipped(path).name != path.stem]
    assert shared, "experiments/study_b_qwen1.5b_sweep.yaml shares its study"
    for path in shared:
        sweep = load_shipped(path).resolved()
        study = load_config(EXPERIMENTS / f"{sweep['name']}.yaml").resolved()
        assert sorted(sweep["train"].pop("methods")) == sorted(study["train"].pop("methods")), path.name
        assert sweep == study, path.name


def load_shipped(path):
    """A shipped YAML's experiment config: a sweep's (harness sweep) is the experiment part of it."""
    from harness.sweep.search import load_sweep

    return load_sweep(path)[0] if "sweep" in yaml.safe_load(path.read_text()) else load_config(path)


def test_format_safety_is_study_b_at_paper_scale():
    cfg = load_config(EXPERIMENTS / "format_safety.yaml")
    assert cfg.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.train.quantize_4bit
    assert (cfg.data.train_size, cfg.data.val_size, cfg.data.test_size) == (1425, 75, 100)
    assert sum(cfg.data.harmful.sources.values()) == 1320
    llm = [judge for judge in cfg.eval.judges if judge.name == "llm"]
    assert llm and llm[0].model == "meta-llama/Llama-3.1-8B-Instruct" and llm[0].threshold == 3


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_judge_templates_load(path, tmp_path, monkeypatch):
    from harness.judges.registry import load_template

    monkeypatch.chdir(tmp_path)  # a shipped config must run from any working directory
    for judge in load_shipped(path).eval.judges:
        if judge.template is not None:
            text = load_template(judge.template)
            assert "{instruction}" in text and "{response}" in text


def test_consistency_is_study_a_at_paper_scale():
    cfg = load_config(EXPERIMENTS / "consistency.yaml")
    assert cfg.model == "meta-llama/Llama-3.2-1B-Instruct" and cfg.seeds == [0, 1, 2, 3, 4]
    assert cfg.data.task == "instructions" and cfg.data.finetune.datasets == ["dolly15k", "alpaca"]
    assert cfg.data.finetune.remove_safety and cfg.data.finetune.equalize
    train = cfg.train
    assert (train.epochs, train.learning_rate, train.batch_size * train.grad_accum) == (5, 2e-5, 64)
    assert train.optimizer == "adamw_bnb_8bit" and train.quantize_4bit
    greedy, sampled = cfg.eval.decoding
    assert (greedy.temperature, greedy.repeats) == (0, 1)
    assert (sampled.temperature, sampled.min_p, sampled.repeats) == (0.7, 0.1, 5)
    fulfilment = cfg.eval.judges[0]
    assert fulfilment.name == "fulfilment" and fulfilment.model == "sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406"
    assert fulfilment.quantize_4bit and cfg.eval.toxicity.backend == "perspective"
    assert cfg.eval.toxicity.categories == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"data": {"task": "instructions"}}, "eval.task must be false"),
        ({"data": {"task": "instructions"}, "eval": {"task": False}, "train": {"methods": ["promot"]}}, "ProMoT"),
        ({"eval": {"toxicity": {"backend": "local"}}}, "needs model_path"),
        ({"data": {"finetune": {"selfgen": {"enabled": True}}}}, "needs data.task 'instructions'"),
        ({"data": {"task": "instructions", "finetune": {"selfgen": {"datasets": ["gsm8k"]}}}, "eval": {"task": False}},
         "not in data.finetune.datasets"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
    ],
)
def test_study_a_settings_are_checked(change, expected):
    with pytest.raises(HarnessError, match=expected):
        parse_config({"name": "x", "model": "m", **change})


def test_fulfilment_judge_defaults_to_sorry_bench():
    cfg = parse_config({"name": "x", "model": "m", "eval": {"judges": [{"name": "fulfilment"}]}})
    assert cfg.eval.judges[0].model == "sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406"
    assert cfg.train.optimizer == "adamw_torch" and cfg.eval.toxicity is None and cfg.data.task == "wikihow"
