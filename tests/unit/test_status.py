"""`harness status`: a study's units as done / running / failed / left, with a rough time left (issue 23).

The first test builds a partly killed store run by run with MLflow's and the tracking package's own calls (a
FINISHED base evaluation, a fine-tune RUNNING in a process that died, one RUNNING in a live process, a checkpoint
that FAILED through `Tracker.run`), so every count and line can be stated exactly. The second kills a real tiny
`harness run` with SIGKILL mid-training (harness/faults.py) and reads its store through the CLI.
"""

import os
import socket
import subprocess
import sys
import time
from io import StringIO

import pytest
import yaml
from typer.testing import CliRunner

from harness.config import parse_config
from harness.study.status import Planner, progress_line, report_progress, show_progress, status_lines, study_status
from tracking import RunHandle, Tracker

HOST = socket.gethostname()


def config(tmp_path, **changes) -> dict:
    data = {
        "name": "st", "model": "smollm2-135m-instruct", "seeds": [0, 1], "output_dir": str(tmp_path / "outputs"),
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
        "data": {"formats": ["prose"], "train_size": 2, "val_size": 1, "test_size": 1,
                 "harmful": {"sources": {"advbench": 1}}},
        "train": {"methods": ["sft"], "epochs": 2, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0,
                  "max_length": 96},
        "eval": {"batch_size": 4, "decoding": [{"temperature": 0, "max_new_tokens": 4}],
                 "judges": [{"name": "keyword"}], "xstest": None},
    }
    for section, values in changes.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return data


class Store:
    """Runs made the way the harness tags them, with chosen start and end times (seconds)."""

    def __init__(self, cfg):
        self.tracker = Tracker(cfg.name, cfg.tracking.uri)
        self.client = self.tracker.client

    def run(self, kind, name, start, end=None, *, parent=None, status="FINISHED", **tags) -> str:
        tags = {"harness.kind": kind, **{f"harness.{key}": str(value) for key, value in tags.items()}}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(self.tracker.experiment_id, start_time=int(start * 1000), run_name=name,
                                        tags=tags).info.run_id
        if end is not None:
            self.client.set_terminated(run_id, status, end_time=int(end * 1000))
        return run_id

    def state(self, units, prefix, parent, start, *, skip=()) -> None:
        """A model state's generations (10 s each) and evaluations (5 s each), FINISHED, under `parent`."""
        for unit in units:
            if not unit.name.startswith(prefix + " ") or unit.name in skip:
                continue
            if unit.kind == "generation":
                benchmark = unit.name.split()[1]
                self.run("generation", unit.name, start, start + 10, parent=parent, config_hash=unit.hashes[0],
                         benchmark=benchmark)
                start += 10
        for unit in units:
            if unit.kind == "evaluation" and unit.name.startswith(prefix + " ") and unit.name not in skip:
                benchmark = unit.name.split()[1]
                judge = {"judge": f"{unit.label}:v1"} if benchmark == "harmful_mix" else {"format": unit.label}
                self.run("evaluation", unit.name, start, start + 5, parent=parent, benchmark=benchmark,
                         generation_hash=unit.generation_hashes[0], **judge)
                start += 5


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_partly_killed_study_counts_and_lines(tmp_path):
    cfg = parse_config(config(tmp_path))
    units = {unit.name: unit for unit in Planner(cfg).study()}
    assert len(units) == 27  # base: checkpoint, 2 generations, 2 evaluations; per seed: fine-tune + 2 x those 5
    store = Store(cfg)
    t0 = time.time() - 3600
    # The base model: FINISHED, its checkpoint's own time 100 - 30 = 70 s.
    base = store.run("checkpoint", "base", t0, t0 + 100, config_hash=units["base"].hashes[0])
    store.state(units.values(), "base", base, t0 + 10)
    # Seed 0: the process training it was SIGKILLed (RUNNING, owner dead) after epoch 1 was evaluated...
    dead = dead_pid()
    finetune0 = store.run("finetune", "sft-prose-seed0", t0 + 200, config_hash=units["sft-prose-seed0"].hashes[0],
                          method="sft", owner=f"{HOST}:{dead}")
    epoch1 = store.run("checkpoint", "sft-prose-seed0-epoch1", t0 + 300, t0 + 400, parent=finetune0,
                       config_hash=units["sft-prose-seed0-epoch1"].hashes[0])
    store.state(units.values(), "sft-prose-seed0-epoch1", epoch1, t0 + 310)
    # ... plus an evaluation by a judge this config no longer has (taking no time: the checkpoint keeps its 70 s) ...
    store.run("evaluation", "old judge", t0 + 399, t0 + 399, parent=epoch1, benchmark="harmful_mix", judge="llm:v0",
              generation_hash=units["sft-prose-seed0-epoch1 harmful_mix T0"].hashes[0])
    # ... and epoch 2's checkpoint failed, through the harness's own run context.
    with pytest.raises(RuntimeError):
        with store.tracker.run("checkpoint", "sft-prose-seed0-epoch2", {"epoch": 2},
                               parent=RunHandle(store.client, finetune0),
                               config_hash=units["sft-prose-seed0-epoch2"].hashes[0]):
            raise RuntimeError("disk full\nTraceback detail that is not the reason")
    # Seed 1: another process on this host is training it now.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        store.run("finetune", "sft-prose-seed1", t0 + 3000, config_hash=units["sft-prose-seed1"].hashes[0],
                  method="sft", owner=f"{HOST}:{alive.pid}")
        status = study_status(cfg)
        lines = status_lines(status)
    finally:
        alive.kill()
        alive.wait()

    by_name = {unit.name: unit for unit in status.units}
    assert [by_name[name].state for name in ("base", "sft-prose-seed0", "sft-prose-seed0-epoch1",
                                             "sft-prose-seed0-epoch2", "sft-prose-seed1", "sft-prose-seed1-epoch1")] \
        == ["done", "running", "done", "failed", "running", "left"]
    counts = status.counts()
    assert (counts.total, counts.done, counts.running, counts.failed, counts.stale, counts.untimed) == (27, 10, 2, 1, 1, 2)
    # Left, with finished ones like them: seed 0's epoch 2 (checkpoint 70 s, 2 generations 10 s, 2 evaluations 5 s)
    # and seed 1's two epochs: 3 x 100 s. The two fine-tunes have nothing finished like them to time them by.
    assert counts.seconds_left == pytest.approx(300, abs=0.01)
    assert lines == [
        f"running: finetune sft-prose-seed0: {HOST}:{dead} (process gone)",
        f"running: finetune sft-prose-seed1: {HOST}:{alive.pid} (alive)",
        "failed: checkpoint sft-prose-seed0-epoch2: RuntimeError: disk full",
        "also in the store: 1 run(s) this config does not make (1 FINISHED)",
        "units 10/27 done, 2 running (1 whose process is gone), 1 failed, ~5 min left "
        "(+ 2 unit(s) not timed: nothing like them has finished yet)",
    ]
    assert progress_line(counts) == "units 10/27, ~5 min left (+ 2 not timed yet)"
    out = StringIO()
    show_progress(counts, file=out)
    assert out.getvalue() == "study progress: units 10/27, ~5 min left (+ 2 not timed yet)\n"


def test_a_study_not_started_is_all_left_and_creates_nothing(tmp_path):
    cfg = parse_config(config(tmp_path, seeds=[0]))
    status = study_status(cfg)
    counts = status.counts()
    assert (counts.total, counts.done, counts.running, counts.failed) == (16, 0, 0, 0)
    assert status_lines(status) == ["units 0/16 done, 0 running, 0 failed, time left unknown (nothing like what is "
                                    "left has finished yet)"]
    assert not (tmp_path / "mlruns").exists()  # status reads; it never makes a store
    out = StringIO()
    report_progress(cfg, file=out)  # what a running study prints after each unit
    assert out.getvalue() == "study progress: units 0/16, time left unknown (nothing like what is left has finished yet)\n"
    out = StringIO()
    report_progress(cfg.model_copy(update={"model": "no/such-model@x y"}), file=out)  # never raises into the study
    assert out.getvalue().startswith("study progress: unavailable (")


def test_status_of_a_really_killed_run(tmp_path):
    """`harness run` SIGKILLed at its first training step (after the base model's evaluation), then `harness status`."""
    from harness.cli.main import app

    data = config(tmp_path, seeds=[0], eval={"task": False})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HARNESS_KILL_AT": "train_step:1"}
    killed = subprocess.Popen([sys.executable, "-m", "harness.cli.main", "run", str(path)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == -9, output[-3000:]

    result = CliRunner().invoke(app, ["status", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-2] == f"running: finetune sft-prose-seed0: {HOST}:{killed.pid} (process gone)"
    assert lines[-1].startswith("units 3/10 done, 1 running (1 whose process is gone), 0 failed, ")
    # base: its checkpoint, the harmful prompts' generation and keyword evaluation; the fine-tune's 2 epochs the same
    rows = {cells[0]: cells[1:6] for line in lines if line.startswith("│")
            for cells in [[cell.strip() for cell in line.split("│")[1:-1]]]}
    assert rows == {"finetune": ["0", "1", "0", "0", "1"], "checkpoint": ["1", "0", "0", "2", "3"],
                    "generation": ["1", "0", "0", "2", "3"], "evaluation": ["1", "0", "0", "2", "3"]}


def test_a_sweeps_trials_come_from_its_optuna_storage(tmp_path):
    """A sweep YAML: its shared units as above, plus one unit per Optuna trial (a stand-in sweep, no model)."""
    from test_optuna_dashboard import small_sweep  # tests/unit is on sys.path under pytest

    _, worker = small_sweep(tmp_path)
    status = study_status(worker.cfg, worker.sweep)
    trials = [unit for unit in status.units if unit.kind == "trial"]
    assert [(unit.name, unit.state) for unit in trials] == [("trial-0", "done"), ("trial-1", "done")]
    assert {unit.run.data.tags["harness.kind"] for unit in trials} == {"trial"}  # linked by the trial's user attr
    # The stand-in made no reference base evaluation and no stage 1: those are left (1 + 4 + 4, and 1).
    counts = status.counts()
    assert (counts.total, counts.done, counts.running, counts.failed) == (12, 2, 0, 0)
    assert not status.other
