"""`harness check`: the config, the model, every dataset file and the judges, verified without loading weights
(issue 19). Every problem is one line on stderr with exit code 2, and nothing is run or recorded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from harness import models
from harness.data import registry as data
from harness.models import PackagedFile

ALIAS = "smollm2-135m-instruct"
DATA_DIR = data.resolve_data_dir()
STUDY_B_DATA = ("wikihow", "advbench", "beavertails_eval", "directharm4", "xstest")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Offline, in an empty working directory: anything a command writes (a store, outputs) would show there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "checked", "model": ALIAS, **settings}))
    return path


def invoke(*args: str):
    from harness.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def copy_data(dest: Path, names=STUDY_B_DATA) -> Path:
    for name in names:
        for rel in data.DATASETS[name].files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DATA_DIR / rel, dest / rel)
    return dest


def drop_csv_column(path: Path, column: str) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, records = [c for c in reader.fieldnames if c != column], list(reader)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


# --- every default runs ------------------------------------------------------------------------


def test_smallest_config_checks_and_its_data_prepares(tmp_path):
    """`name` and `model` only: every default (the harmful mix, XSTest, the task split) must fit the data.
    The default mix used to ask DirectHarm4 for 440 of its 400 prompts."""
    from harness.config import load_config
    from harness.study.runner import prepare_data

    config = write_config(tmp_path)
    result = invoke("check", config)
    assert result.exit_code == 0, result.output
    for line in ("ok    config: ", "ok    data: wikihow: train 1,425 / val 75 / test 100 procedures in 3 format(s)",
                 "ok    data: harmful mix: 1,320 prompts (advbench 440, beavertails_eval 480, directharm4 400)",
                 "ok    data: xstest: 250 safe, 200 unsafe prompts", f"ok    model: packaged alias '{ALIAS}'",
                 "ok    judge 1 (keyword)", "all checks passed"):
        assert line in result.stdout, line

    prepared = prepare_data(load_config(config))  # what `harness run` prepares first
    assert [len(prepared.train[f]) for f in ("prose", "list", "json")] == [1425] * 3
    assert (len(prepared.val["json"]), len(prepared.test["json"])) == (75, 100)
    assert Counter(p.source for p in prepared.harmful) == {"advbench": 440, "beavertails_eval": 480, "directharm4": 400}
    assert (len(prepared.xstest_safe), len(prepared.xstest_unsafe)) == (250, 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]  # no store, no outputs: nothing was run


def test_study_a_defaults_prepare(tmp_path):
    """Study A's defaults (Dolly and Alpaca, safety rows removed, equalised) run as they stand: the default
    `data.bad_rows: drop` skips Alpaca's 4 empty responses (with 'error' they stop the run)."""
    config = write_config(tmp_path, data={"task": "instructions"}, eval={"task": False})
    result = invoke("check", config)
    assert result.exit_code == 0, result.output
    assert "ok    data: dolly15k: 8,879 training rows" in result.stdout
    assert "ok    data: alpaca: 8,879 training rows" in result.stdout


# --- what check catches, without loading weights -----------------------------------------------


@pytest.fixture
def no_chat_template_dir(tmp_path, make_tiny_llama) -> Path:
    """A loadable model directory whose tokenizer (the packaged SmolLM2's) was saved without its chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path / "no-chat-template"
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model(ALIAS).location)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    make_tiny_llama(tokenizer).save_pretrained(folder)
    return folder


def _no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("harness check loaded model weights")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "_convert_gguf", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def test_model_without_chat_template_is_caught_by_check(tmp_path, no_chat_template_dir, monkeypatch):
    _no_weights(monkeypatch)
    result = invoke("check", write_config(tmp_path, model=str(no_chat_template_dir)))
    assert_one_line_error(result, f"model: model directory '{no_chat_template_dir}' has no chat template")
    assert "FAIL  model: " in result.stdout


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return {"model": str(tmp_path / "empty")}


def _ghost_alias(tmp_path, monkeypatch):
    parts = tuple(PackagedFile(f"no-such-model-part{n}", f"no_such_model_part{n}", "data/x.bin") for n in (1, 2, 3))
    monkeypatch.setitem(models.ALIASES, "ghost-model", parts)
    return {"model": "ghost-model"}


def _template(tmp_path, text):
    (tmp_path / "rubric.txt").write_text(text)
    return {"eval": {"judges": [{"name": "llm", "model": ALIAS, "template": str(tmp_path / "rubric.txt")}]}}


def _missing_column(tmp_path):
    root = copy_data(tmp_path / "data")
    drop_csv_column(root / "advbench/harmful_behaviors.csv", "goal")
    return {"data": {"data_dir": str(root)}}


CASES = {
    "model directory without config": (_empty_dir, ("model directory", "empty' has no config.json")),
    "alias not installed": (_ghost_alias, ("model alias 'ghost-model'", "pip install no-such-model-part{1..3}")),
    "unknown model": (lambda tmp_path: {"model": "not a model"}, ("unknown model 'not a model'",)),
    "judge template missing": (lambda tmp_path: {"eval": {"judges": [{"name": "llm", "model": ALIAS,
                                                                      "template": "no_such_rubric.txt"}]}},
                               ("judge 1 (llm): judge template not found: no_such_rubric.txt",)),
    "judge template without {response}": (lambda tmp_path: _template(tmp_path, "Rate {instruction}."),
                                          ("judge 1 (llm): judge template", "lacks the placeholder {response}")),
    "judge model missing": (lambda tmp_path: {"eval": {"judges": [{"name": "keyword"},
                                                                   {"name": "llm", "model": str(tmp_path / "nope")}]}},
                            ("judge 2 (llm): ", "unknown model")),
    "trained judge directory missing": (lambda tmp_path: {"eval": {"judges": [{"name": "trained",
                                                                              "path": str(tmp_path / "nojudge")}]}},
                                        ("judge 1 (trained): ", "is not a judge directory")),
    "classifier model missing": (lambda tmp_path: {"eval": {"judges": [{"name": "harmbench",
                                                                        "model": str(tmp_path / "nope")}]}},
                                 ("judge 1 (harmbench): ", "unknown model")),
    "missing column": (_missing_column, ("data: ", "advbench/harmful_behaviors.csv", "missing column 'goal'")),
    "more prompts than a source has": (lambda tmp_path: {"data": {"harmful": {"sources": {"directharm4": 401}}}},
                                       ("harmful source 'directharm4' (data.harmful.sources): asked for 401 rows but only 400",)),
    "task split larger than the data": (lambda tmp_path: {"data": {"train_size": 2901}},
                                        ("data.train_size, val_size, test_size (2901, 75, 100) sum to 3076 but "
                                         "there are only 3000 rows",)),
    "more XSTest prompts than it has": (lambda tmp_path: {"eval": {"xstest": {"safe": 251}}},
                                        ("eval.xstest.safe: asked for 251 rows but only 250 are available",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_catches_what_a_run_would_fail_on(tmp_path, monkeypatch, case):
    make, needles = CASES[case]
    settings = make(tmp_path, monkeypatch) if make is _ghost_alias else make(tmp_path)
    _no_weights(monkeypatch)
    result = invoke("check", write_config(tmp_path, **settings))
    assert_one_line_error(result, *needles)
    assert "FAIL  " in result.stdout and "all checks passed" not in result.stdout


def test_check_reports_every_problem_in_one_line(tmp_path):
    config = write_config(tmp_path, model=str(tmp_path / "nowhere" / "model"), data={"train_size": 2901},
                          eval={"judges": [{"name": "llm", "model": ALIAS, "template": "no_such_rubric.txt"}]})
    assert_one_line_error(invoke("check", config), "error: 3 problems: data: ", "; model: ", "; judge 1 (llm): ")


def test_hub_model_offline_is_said_not_failed(tmp_path):
    result = invoke("check", write_config(tmp_path, model="no-such-org/no-such-model"))
    assert result.exit_code == 0, result.output
    assert "note  model: hub id no-such-org/no-such-model@main: cannot be verified offline" in result.stdout


# --- a run with bad data: one line, no run ---------------------------------------------------------


def test_run_with_corrupt_data_is_one_line_and_creates_no_run(tmp_path):
    root = copy_data(tmp_path / "data")
    broken = root / "wikihow_lists_summary/wikihow_lists_summary_first3000.csv"
    raw = broken.read_bytes()
    broken.write_bytes(raw[:5000] + b"\xff" + raw[5001:])
    config = write_config(tmp_path, data={"data_dir": str(root)}, output_dir=str(tmp_path / "outputs"),
                          tracking={"uri": f"sqlite:///{tmp_path / 'store.db'}"})
    assert_one_line_error(invoke("run", config), str(broken), "not UTF-8")
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "mlruns").exists()
    assert_one_line_error(invoke("check", config), "data: ", str(broken), "not UTF-8")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "experiments").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_experiment_prepares_its_data_or_names_its_hub_only_dataset(path):
    """A shipped study must run as it stands: its data selection fits the local data (format_safety.yaml once
    asked DirectHarm4 for 440 of its 400 prompts). Only a hub-only source may stop it, naming its hub id."""
    from harness.config import parse_config, read_yaml
    from harness.data.registry import DatasetNotFoundError
    from harness.study.runner import prepare_data

    raw = read_yaml(path)
    raw.pop("sweep", None)  # a sweep file is an experiment config plus its search space
    cfg = parse_config(raw, str(path))
    hub_only = [name for name in cfg.data.harmful.sources if not data.DATASETS[name].files]
    if hub_only:
        with pytest.raises(DatasetNotFoundError, match="hub only"):
            prepare_data(cfg)
        return
    prepared = prepare_data(cfg)
    expected = sum(cfg.data.harmful.sources.values())
    assert len(prepared.harmful) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says (CI's)")
def test_what_needs_a_gpu_is_checked_before_a_run(tmp_path):
    """QLoRA's 4-bit loading would stop the run at once without CUDA: `check` says so first, naming the field; 8-bit
    AdamW falls back (the run's tag records it); a judge served by vLLM needs CUDA and the vllm package."""
    eight_bit = write_config(tmp_path, train={"optimizer": "adamw_bnb_8bit"})
    result = invoke("check", eight_bit)
    assert result.exit_code == 0, result.output
    assert "ok    gpu: train.optimizer adamw_bnb_8bit: runs as adamw_torch (adamw_bnb_8bit requested; fallback: no " \
           "CUDA)" in result.output
    served = write_config(tmp_path, eval={"judges": [{"name": "strongreject", "model": ALIAS, "engine": "vllm"}]})
    assert_one_line_error(invoke("check", served), "gpu: eval.judges (strongreject): engine: vllm cannot run here",
                          "no CUDA device", "set engine: hf")
    qlora = write_config(tmp_path, train={"quantize_4bit": True}, output_dir=str(tmp_path / "outputs"),
                         tracking={"uri": f"sqlite:///{tmp_path / 'store.db'}"})
    assert_one_line_error(invoke("check", qlora), "gpu: train.quantize_4bit needs CUDA and bitsandbytes",
                          "no CUDA device", "set it to false")
    assert_one_line_error(invoke("run", qlora), "quantize_4bit needs CUDA and bitsandbytes", "no CUDA device")
    assert not (tmp_path / "store.db").exists()  # stopped before any run was made
