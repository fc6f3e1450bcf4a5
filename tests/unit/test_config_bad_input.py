"""Bad config input is one line naming the file, field or value (a HarnessError; the CLI's one stderr line and a
non-zero exit), never a traceback, a silently-kept value or a run: bytes that are not UTF-8, a key given twice,
inf/NaN, true/false for a number, an unknown LR schedule, empty or repeated lists, and unsafe study names."""

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from harness.config import ExperimentConfig, JudgeConfig, load_config, parse_config
from harness.errors import HarnessError
from harness.sweep.search import SweepConfig, load_sweep

from helpers import nested_models, write

BASE = {"name": "x", "model": "m"}
SWEEP = {"name": "unit-sweep", "model": "m", "data": {"formats": ["prose"]},
         "sweep": {"sampler": "grid", "grid": {"train.learning_rate": [5.0e-5, 1.0e-4]}}}
REQUIRED = {ExperimentConfig: BASE, JudgeConfig: {"name": "keyword"}}


def one_line_error(load, path: Path, *expected: str) -> str:
    """`load(path)` raises a one-line HarnessError that names the file and contains every `expected` string."""
    with pytest.raises(HarnessError) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for part in expected:
        assert part in message, message
    return message


def nested(data: dict, dotted: str, value) -> dict:
    """`data` with the dotted path set to `value` (a number in the path indexes a list)."""
    data = yaml.safe_load(yaml.safe_dump(data))
    node = data
    *parents, leaf = dotted.split(".")
    for part, following in zip(parents, parents[1:] + [leaf]):
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, [{}] if following.isdigit() else {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return data


# -- the file itself ------------------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = write(tmp_path, "name: x\nmodel: m\n# caf\u00e9\n".encode("latin-1"))
    one_line_error(load_config, path, "line 3", "not UTF-8", "0xe9")


def test_a_control_character_is_one_line_naming_the_line(tmp_path):
    path = write(tmp_path, b"name: x\nmodel: m\x00\n")
    one_line_error(load_config, path, "line 2", "not valid YAML", "'\\x00'")


@pytest.mark.parametrize("text, key, line", [
    ("name: x\nmodel: m\nname: y\n", "'name'", 3),
    ("name: x\nmodel: m\ntrain:\n  learning_rate: 1.0e-4\n  epochs: 1\n  learning_rate: 2.0e-4\n", "'learning_rate'", 6),
    ("name: x\nmodel: m\ntrain:\n  lora:\n    r: 8\n    r: 16\n", "'r'", 6),
    ("name: x\nmodel: m\neval:\n  judges:\n    - name: keyword\n      threshold: 2\n      threshold: 4\n", "'threshold'", 7),
    ("name: x\nmodel: m\ntrain: {epochs: 1, epochs: 2}\n", "'epochs'", 3),
], ids=["top", "train", "train.lora", "list-item", "flow"])
def test_a_key_given_twice_at_any_depth_names_the_key_and_line(tmp_path, text, key, line):
    one_line_error(load_config, write(tmp_path, text), f"line {line}", f"duplicate key {key}")


def test_a_key_given_twice_in_a_sweep_names_the_key_and_line(tmp_path):
    text = yaml.safe_dump(SWEEP, sort_keys=False).replace(
        "    train.learning_rate:\n", "    train.learning_rate: [1.0e-3]\n    train.learning_rate:\n", 1)
    path = write(tmp_path, text)
    line = text.splitlines().index("    train.learning_rate:") + 1
    one_line_error(load_sweep, path, f"line {line}", "duplicate key 'train.learning_rate'")


def test_a_merge_key_may_be_overridden(tmp_path):
    """Guard (passes before and after): YAML's `<<: *anchor` then an override of one key is not a duplicate."""
    text = ("name: x\nmodel: m\neval:\n  decoding:\n    - &greedy {temperature: 0, max_new_tokens: 8}\n"
            "    - <<: *greedy\n      temperature: 0.7\n")
    cfg = load_config(write(tmp_path, text))
    assert [(d.temperature, d.max_new_tokens) for d in cfg.eval.decoding] == [(0, 8), (0.7, 8)]


# -- numbers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("train.learning_rate", ".inf"),
    ("train.learning_rate", ".nan"),
    ("train.promot.stage1.learning_rate", ".inf"),
    ("train.promot.stage1.epochs", ".inf"),
    ("train.lora.dropout", ".nan"),
    ("eval.decoding.0.temperature", ".inf"),
    ("eval.decoding.0.min_p", ".nan"),
    ("eval.toxicity.requests_per_second", ".inf"),
])
def test_inf_and_nan_are_refused(tmp_path, field, value):
    text = yaml.safe_dump(nested(BASE, field, "VALUE")).replace("VALUE", value)
    one_line_error(load_config, write(tmp_path, text), f"{field}: Input should be a finite number")


@pytest.mark.parametrize("field", ["train.batch_size", "train.epochs", "train.lora.r", "seeds.0", "data.split_seed",
                                   "data.harmful.sources.advbench", "eval.xstest.safe", "eval.judges.0.threshold",
                                   "train.learning_rate", "eval.decoding.0.temperature"])
def test_true_is_not_a_number(tmp_path, field):
    data = nested(BASE, field, True)
    if field.startswith("eval.judges"):
        data["eval"]["judges"][0]["name"] = "keyword"
    one_line_error(load_config, write(tmp_path, data), f"{field}: Input should be a number, not true/false")


def test_yaml_numbers_still_parse():
    """Guard: plain YAML ints and floats (and exact floats for ints, as a sweep's float range gives) still parse."""
    cfg = parse_config({**BASE, "seeds": [0, 1], "train": {"batch_size": 4, "epochs": 2.0, "learning_rate": 1},
                        "data": {"harmful": {"sources": {"advbench": 3, "directharm4": None}}}})
    assert (cfg.seeds, cfg.train.batch_size, cfg.train.epochs, cfg.train.learning_rate) == ([0, 1], 4, 2, 1.0)


def all_models() -> list[type[BaseModel]]:
    """Every config model reachable from the experiment config and the sweep section, behind lists and optionals."""
    found, todo = [], [ExperimentConfig, SweepConfig]
    while todo:
        model = todo.pop()
        if model not in found:
            found.append(model)
            todo += [sub for info in model.model_fields.values() for sub in nested_models(info.annotation)]
    return found


def leaf_types(annotation) -> set:
    """The scalar types a field holds: int for `list[int]`, {int, NoneType} for `dict[str, int | None]`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return leaf_types(typing.get_args(annotation)[0])
    if origin in (list, dict):
        return leaf_types(typing.get_args(annotation)[-1])
    if typing.get_args(annotation) and origin is not typing.Literal:
        return set().union(*(leaf_types(arg) for arg in typing.get_args(annotation)))
    return {annotation}


def shaped(annotation, value):
    """`value` where a field of `annotation` holds its numbers: as is, in a list, or as a dict value."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return shaped(typing.get_args(annotation)[0], value)
    if origin is list:
        return [value]
    if origin is dict:
        return {"k": [value] if typing.get_origin(typing.get_args(annotation)[-1]) is list else value}
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) in (list, dict, typing.Annotated):
            return shaped(arg, value)
    return value


def fields_holding(kinds: set) -> list:
    return [(model, name, info.annotation) for model in all_models() for name, info in model.model_fields.items()
            if leaf_types(info.annotation) & kinds]


def fails_at(model, name, value) -> bool:
    try:
        model.model_validate({**REQUIRED.get(model, {}), name: value})
    except ValidationError as error:
        return any(item["loc"][:1] == (name,) for item in error.errors())
    return False


def test_every_float_field_refuses_inf_and_nan():
    checked = fields_holding({float})
    assert {(model.__name__, name) for model, name, _ in checked} >= {
        ("DecodingConfig", "min_p"), ("ParamRange", "low"), ("ParamRange", "choices"), ("SweepConfig", "grid")}
    for model, name, annotation in checked:
        for value in (math.inf, -math.inf, math.nan):
            assert fails_at(model, name, shaped(annotation, value)), f"{model.__name__}.{name} takes {value}"


def test_every_number_field_refuses_true_and_false():
    checked = [(model, name, annotation) for model, name, annotation in fields_holding({int, float})
               if not leaf_types(annotation) & {bool, str}]  # a sweep's `choices` may be true/false on purpose
    assert {(model.__name__, name) for model, name, _ in checked} >= {
        ("ExperimentConfig", "seeds"), ("HarmfulConfig", "sources"), ("XSTestConfig", "safe"), ("SweepConfig", "n_trials")}
    for model, name, annotation in checked:
        for value in (True, False):
            assert fails_at(model, name, shaped(annotation, value)), f"{model.__name__}.{name} takes {value}"


# -- learning-rate schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["train.lr_scheduler", "train.promot.stage1.lr_scheduler"])
def test_an_unknown_lr_scheduler_lists_the_allowed_names(tmp_path, field):
    from transformers.trainer_utils import SchedulerType

    message = one_line_error(load_config, write(tmp_path, nested(BASE, field, "cosin")),
                             f"{field}: Value error, unknown scheduler 'cosin'; use one of: ")
    allowed = message.split("use one of: ")[1].split(" (got")[0].split(", ")
    assert allowed == [member.value for member in SchedulerType]  # transformers' own list, not a copy of it
    assert parse_config({**BASE, "train": {"lr_scheduler": "constant_with_warmup"}}).train.lr_scheduler == "constant_with_warmup"


def test_scheduler_names_read_without_importing_transformers_are_the_enum(monkeypatch):
    """Importing transformers.trainer_utils costs seconds, so the names are read from its source unless it is loaded."""
    from transformers.trainer_utils import SchedulerType

    from harness.config import scheduler_names

    monkeypatch.delitem(sys.modules, "transformers.trainer_utils")
    scheduler_names.cache_clear()
    try:
        assert scheduler_names() == tuple(member.value for member in SchedulerType)
        assert "transformers.trainer_utils" not in sys.modules
    finally:
        scheduler_names.cache_clear()


def test_reading_a_config_does_not_import_transformers():
    """Guard (passes before and after): the scheduler check must not make every config load import torch and
    transformers (seconds; the sweep's worker tests time their workers' start-up)."""
    code = ("import sys; from harness.config import parse_config; parse_config({'name': 'x', 'model': 'm'}); "
            "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_a_check_across_sections_names_its_field_not_the_whole_file():
    with pytest.raises(HarnessError) as error:
        parse_config({**BASE, "data": {"task": "instructions"}, "eval": {"task": False}, "train": {"methods": ["promot"]}})
    assert str(error.value) == ("config: train.methods: ProMoT needs a format to learn; use 'sft' with data.task "
                                "'instructions'")


# -- lists ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("data.formats", [], "give at least one format"),
    ("train.methods", [], "give at least one method"),
    ("eval.decoding", [], "give at least one decoding setting"),
    ("eval.judges", [], "give at least one judge"),
    ("seeds", [0, 1, 0], "each seed once: 0 repeated"),
    ("data.formats", ["prose", "json", "prose"], "each format once: 'prose' repeated"),
    ("train.methods", ["sft", "sft"], "each method once: 'sft' repeated"),
], ids=["no-formats", "no-methods", "no-decoding", "no-judges", "repeated-seed", "repeated-format", "repeated-method"])
def test_empty_or_repeated_lists_are_errors(tmp_path, field, value, expected):
    one_line_error(load_config, write(tmp_path, nested(BASE, field, value)), f"{field}: Value error, {expected}")


def test_no_formats_with_the_task_on_is_an_error_but_study_a_has_none():
    with pytest.raises(HarnessError, match="data.formats: Value error, give at least one format"):
        parse_config({**BASE, "data": {"formats": []}, "eval": {"task": True}})
    # Study A's instruction datasets have no formats: the field is not part of its data section at all.
    cfg = parse_config({**BASE, "data": {"task": "instructions"}, "eval": {"task": False}})
    assert cfg.data.formats == []


@pytest.mark.parametrize("data, expected", [
    ({"task": "instructions", "formats": ["list"]}, "config: data.formats: needs data.task 'wikihow' (this config's "
                                                     "data.task is 'instructions')"),
    ({"task": "instructions", "train_size": 3}, "config: data.train_size: needs data.task 'wikihow'"),
    ({"finetune": {"datasets": ["alpaca"]}}, "config: data.finetune: needs data.task 'instructions' (this config's "
                                             "data.task is 'wikihow')"),
    ({"task": "chat"}, "config: data.task: must be one of 'wikihow', 'instructions' (got 'chat')"),
    ({"task": "instructions", "finetune": {"size": 0}}, "config: data.finetune.size: Input should be greater than"),
    ({"task": "instructions", "harmful": {"sources": {}}}, "config: data.harmful.sources: Value error, empty prompt set"),
])
def test_each_study_has_its_own_data_section(data, expected):
    """The data section is one of two shapes chosen by `task` (a discriminated union): a field of the other study's
    shape is named with the task it needs, and errors inside a shape name the YAML path without the union's tag."""
    with pytest.raises(HarnessError) as error:
        parse_config({**BASE, "data": data, "eval": {"task": False}})
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_a_sweep_with_no_judges_is_one_line_at_load_time(tmp_path):
    path = write(tmp_path, {**SWEEP, "eval": {"judges": []}})
    one_line_error(load_sweep, path, "eval.judges: Value error, give at least one judge")


@pytest.mark.parametrize("field, value, expected", [
    ("sweep.n_trials", True, "sweep.n_trials: Input should be a number, not true/false"),
    ("sweep.study_name", "../x", "sweep.study_name: Value error, study name '../x' is not a safe file name"),
], ids=["bool-trials", "unsafe-study-name"])
def test_bad_sweep_settings_are_one_line(tmp_path, field, value, expected):
    one_line_error(load_sweep, write(tmp_path, nested(SWEEP, field, value)), expected)


def test_an_infinite_sweep_range_is_refused(tmp_path):
    data = nested(SWEEP, "sweep", {"sampler": "tpe", "space": {"train.learning_rate": {"low": 1.0e-5, "high": "HIGH"}}})
    path = write(tmp_path, yaml.safe_dump(data).replace("HIGH", ".inf"))
    one_line_error(load_sweep, path, "sweep.space.train.learning_rate.high: Input should be a finite number")


# -- study names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".hidden", "..", "   ", " x", "x y", "tab\tname",
                                  "new\nline", "bell\x07", "caf\u00e9"])
def test_an_unsafe_study_name_is_refused(tmp_path, name):
    message = one_line_error(load_config, write(tmp_path, {**BASE, "name": name}), "name: Value error, study name",
                             "is not a safe file name")
    assert repr(name) in message


def test_safe_study_names_are_accepted():
    """Guard: every study name the shipped configs and the tests use (and an empty one is still refused)."""
    shipped = {yaml.safe_load(path.read_text())["name"] for path in (Path(__file__).parents[2] / "experiments").glob("*.yaml")}
    for name in shipped | {"x", "e2e", "e2e-promot", "unit-sweep", "pg-sweep", "x-v2", "A.b_c-1"}:
        assert parse_config({**BASE, "name": name}).name == name
    with pytest.raises(HarnessError, match="name"):
        parse_config({**BASE, "name": ""})
