"""Two `harness sweep` workers on one study in a real PostgreSQL (a private server on 127.0.0.1, started here
with scripts/start-postgres; or $HARNESS_TEST_POSTGRES_URL), MLflow in the same server: no trial is run twice,
the trial cap holds, and a worker SIGKILLed mid-trial leaves its trial FAIL (by heartbeat) while the other
worker retries it and finishes the study.

Skipped only outside CI when no PostgreSQL server binaries are installed; in CI (CI=true) that is a failure.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from helpers import of_kind, tag

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GRID = [1.0e-4, 2.0e-4, 3.0e-4, 5.0e-4]
STUDY = {
    "name": "pg-sweep",
    "model": "smollm2-135m-instruct",
    "data": {"formats": ["prose"], "train_size": 2, "val_size": 1, "test_size": 1,
             "harmful": {"sources": {"advbench": 1}}},
    "train": {"batch_size": 2, "grad_accum": 1, "epochs": 1, "warmup_steps": 0, "max_length": 64,
              "promot": {"prompt_length": 2, "stage1": {"batch_size": 2, "grad_accum": 1, "warmup_steps": 0}}},
    "eval": {"batch_size": 8, "decoding": [{"temperature": 0, "max_new_tokens": 4}], "judges": [{"name": "keyword"}],
             "xstest": None},
    "sweep": {"sampler": "grid", "grid": {"train.learning_rate": GRID}, "reference_sft": False,
              "heartbeat_interval": 1, "grace_period": 15},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_binaries() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.fixture(scope="module")
def server():
    """A URL to a PostgreSQL server where we may create databases."""
    if os.environ.get("HARNESS_TEST_POSTGRES_URL"):
        yield os.environ["HARNESS_TEST_POSTGRES_URL"]
        return
    if not server_binaries():
        message = "PostgreSQL server binaries (initdb) not installed: apt-get install postgresql (.ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    directory = tempfile.mkdtemp(prefix="harness-pg-")  # not under pytest's tmp: the postgres user must reach it
    script = ROOT / "scripts" / "start-postgres"
    started = subprocess.run(["bash", str(script), directory, str(free_port())], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", directory], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A fresh database on the server; its SQLAlchemy URL with the psycopg (3) driver, as Optuna and MLflow take it."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return plain.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + f"/{name}"


def worker(config: Path, storage: str, cwd: Path, log: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "harness.cli.main", "sweep", str(config), "--storage", storage],
                            cwd=cwd, env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT)


def trials_of(storage: str) -> list:
    try:
        return optuna.load_study(study_name=STUDY["name"], storage=storage).get_trials()
    except KeyError:
        return []


def test_two_workers_one_killed_mid_trial(server, tmp_path):
    storage = create_database(server, "optuna_sweep_test")
    tracking = create_database(server, "mlflow_sweep_test")
    MlflowClient(tracking_uri=tracking).search_experiments()  # create MLflow's tables before two workers race to
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**STUDY, "tracking": {"uri": tracking}}))

    survivor = worker(config, storage, tmp_path, tmp_path / "survivor.log")
    deadline = time.time() + 900
    while not trials_of(storage):  # the survivor has done the shared set-up and holds trial 0
        assert survivor.poll() is None, (tmp_path / "survivor.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(2)
    # Its first training step is in its first trial's stage 2 (stage 1 is shared, already trained): mid-trial.
    victim = worker(config, storage, tmp_path, tmp_path / "victim.log", HARNESS_KILL_AT="train_step:1")
    assert victim.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    assert survivor.wait(timeout=1200) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    output = (tmp_path / "survivor.log").read_text()

    trials = trials_of(storage)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    (failed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert not [t for t in trials if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    # The cap: n_trials (the grid's 4) completed, plus the dead trial's FAIL that its retry replaced.
    assert len(complete) == len(GRID) and len(trials) == len(GRID) + 1
    # No trial run twice: every grid point completed exactly once, the dead one's by its retry.
    assert sorted(t.params["train.learning_rate"] for t in complete) == GRID
    assert failed.user_attrs["worker"].endswith(f":{victim.pid}")
    (retry,) = [t for t in complete if t.system_attrs.get("retry_history")]
    assert retry.system_attrs["retry_history"] == [failed.number] and retry.params == failed.params
    assert f"trial {failed.number}: worker" in output and "no heartbeat for 15s" in output

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name(STUDY["name"]).experiment_id], max_results=1000)
    trial_runs = of_kind(runs, "trial")
    finished = [run for run in trial_runs if run.info.status == "FINISHED"]
    assert sorted(int(tag(run, "trial_number")) for run in finished) == sorted(t.number for t in complete)
    dead = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "no heartbeat" in dead.data.tags["harness.error"]
    assert not [run for run in runs if run.info.status == "RUNNING"]  # nothing left looking alive
    assert len([run for run in of_kind(runs, "stage") if tag(run, "stage") == "1"]) == 1  # stage 1 shared
    (sweep,) = of_kind(runs, "sweep")
    assert sweep.info.status == "FINISHED" and tag(sweep, "optuna_storage") == storage  # no password to redact here
