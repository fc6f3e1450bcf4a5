"""The sweep's worker loop on a real SQLite Optuna storage with real worker processes and a stand-in objective
(no model): distinct grid points, the trial cap across workers, TPE draws, and a SIGKILLed worker's trial failed
by heartbeat and retried by the other. Split from tests/unit/test_sweep.py (which keeps the in-process checks)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from harness.config import ExperimentConfig
from harness.sweep.search import Sweep, SweepConfig

ROOT = Path(__file__).resolve().parents[2]


# -- the worker loop on a real storage, with a stand-in objective -----------------------------------------

GRID = [1.0, 2.0, 3.0, 4.0, 5.0]


class FakeSweep(Sweep):
    """The real loop, lock, heartbeat and retry; the objective just waits and returns numbers from the LR."""

    def run_trial(self, trial, params):
        if os.environ.get("FAKE_DIE_ON_TRIAL") and not hasattr(self, "died"):
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-trial, heartbeat running, like a pre-empted machine
        time.sleep(float(os.environ.get("FAKE_TRIAL_SECONDS", "1")))
        lr = params["train.learning_rate"]
        return lr / 10, 1 - (lr - 3) ** 2 / 10


def fake_worker(url: str) -> None:
    """Entry point of one worker process (see `start_worker`)."""
    cfg = ExperimentConfig(name="fake", model="x", data={"formats": ["prose"]})
    if os.environ.get("FAKE_SAMPLER") == "tpe":
        sweep = SweepConfig(sampler="tpe", space={"train.learning_rate": {"low": 1.0, "high": 5.0}}, n_trials=4,
                            heartbeat_interval=1, grace_period=3)
    else:
        sweep = SweepConfig(sampler="grid", grid={"train.learning_rate": GRID}, heartbeat_interval=1, grace_period=3)
    worker = FakeSweep(cfg, sweep)
    worker.open_study(url)
    worker.work()


def start_worker(url: str, **env) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'e2e')!r}); from test_sweep_workers import fake_worker; fake_worker({url!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_trials(url: str) -> list:
    try:
        return optuna.load_study(study_name="fake", storage=url).get_trials()
    except KeyError:  # not created yet
        return []


def test_two_workers_share_the_grid_without_repeats_and_respect_the_cap(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    workers = [start_worker(url, FAKE_TRIAL_SECONDS=str(random.uniform(0.5, 1.5))) for _ in range(2)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    trials = study_trials(url)
    assert len(trials) == len(GRID)  # the cap: never a sixth trial, though both workers asked until the end
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["train.learning_rate"] for t in trials) == GRID  # each grid point exactly once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both really worked


def test_two_tpe_workers_with_one_seed_never_draw_the_same_point(tmp_path):
    """Both workers build TPE from sweep.seed; were it not reseeded per ask, their first draws would coincide."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    workers = [start_worker(url, FAKE_SAMPLER="tpe", FAKE_TRIAL_SECONDS="1") for _ in range(2)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    trials = study_trials(url)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["train.learning_rate"] for t in trials}) == 4, [t.params for t in trials]
    assert len({t.user_attrs["worker"] for t in trials}) == 2


def test_killed_worker_trial_fails_by_heartbeat_and_is_retried_by_the_other(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    survivor = start_worker(url, FAKE_TRIAL_SECONDS="2")
    while not study_trials(url):  # the survivor holds trial 0 before the victim starts
        time.sleep(0.2)
    victim = start_worker(url, FAKE_DIE_ON_TRIAL="1")
    assert victim.wait(timeout=60) == -signal.SIGKILL
    output = survivor.communicate(timeout=180)[0]
    assert survivor.returncode == 0, output
    trials = study_trials(url)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(failed) == 1 and len(complete) == len(GRID) and len(trials) == len(GRID) + 1
    assert sorted(t.params["train.learning_rate"] for t in complete) == GRID  # the dead trial's point, retried once
    (retry,) = [t for t in complete if t.system_attrs.get("retry_history")]
    assert retry.system_attrs["retry_history"] == [failed[0].number]
    assert retry.params == failed[0].params and failed[0].user_attrs["worker"].endswith(f":{victim.pid}")
    assert f"trial {failed[0].number}: worker" in output and "no heartbeat for 3s" in output
