"""optuna-dashboard on a sweep's real Optuna storage: the study, its named objectives and the links back to MLflow.

A two-point grid sweep runs through the harness's own study creation (`Sweep.open_study`, `open_sweep_run`) and
trial loop (`work`, `run_trial`, which opens the real MLflow `trial` run) into a SQLite Optuna storage and a SQLite
MLflow store; only the fine-tuning is a stand-in (no model). Then the installed `optuna-dashboard` command serves
that storage on a free local port, and its JSON API (the routes its web page reads) must show what a person opening
the dashboard should see.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from harness.sweep.search import Sweep, parse_sweep, storage_url
from tracking import Tracker

SECRET_URI = "postgresql+psycopg://alice:s3cr3t@db.example/mlflow"


class StandInRunner:
    """What a trial asks of the runner, with no model: fine-tunes nothing, names each seed's unit."""

    def __init__(self, cfg):
        self.cfg, self.summary = cfg, []

    def finetune(self, method, fmt, seed, parent=None):
        pass

    def finetune_unit(self, fmt, method, seed):
        return {"method": method, "format": fmt, "seed": seed, "lr": self.cfg.train.learning_rate}


class NoModelSweep(Sweep):
    """The real sweep worker; its objectives come from the sampled learning rate instead of evaluations."""

    def objectives(self, units):
        lr = units[0]["lr"]
        return {"asr": lr * 1000, "asr_std": 0.0, "asr_n": 1, "sbert": 1 - lr * 100, "sbert_std": 0.0,
                "finetune_runs": "stand-in"}


def small_sweep(tmp_path: Path) -> tuple[str, NoModelSweep]:
    cfg, sweep = parse_sweep({
        "name": "dash", "model": "smollm2-135m-instruct", "data": {"formats": ["prose"]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
        "eval": {"judges": [{"name": "keyword"}]},
        "sweep": {"sampler": "grid", "grid": {"train.learning_rate": [1.0e-4, 3.0e-4]}, "reference_sft": False},
    }, "dash.yaml")
    worker = NoModelSweep(cfg, sweep)
    worker.runner = StandInRunner(cfg)
    worker.tracker = Tracker(cfg.name, cfg.tracking.uri)
    url = storage_url(sweep, worker.tracker.tracking_uri)
    worker.open_study(url)
    worker.tracker.tracking_uri = SECRET_URI  # as if the store were a server with a password: only ever shown redacted
    worker.open_sweep_run()
    worker.work()
    worker.tracker.tracking_uri = cfg.tracking.uri
    return url, worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def serve(url: str, port: int) -> subprocess.Popen:
    """The `optuna-dashboard` command the set-up installs (beside this Python), on `url`; returns once it answers."""
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            get(port, "/api/meta")
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"optuna-dashboard did not start: {server.communicate()[0][-2000:]}")
            time.sleep(0.3)


def attrs(serialized: list[dict]) -> dict:
    return {attr["key"]: attr["value"] for attr in serialized}


def test_dashboard_shows_the_study_its_objectives_and_mlflow_links(tmp_path):
    url, worker = small_sweep(tmp_path)
    port = free_port()
    server = serve(url, port)
    try:
        studies = get(port, "/api/studies")["study_summaries"]
        study = next(study for study in studies if study["study_name"] == "dash")
        detail = get(port, f"/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert detail["directions"] == ["minimize", "maximize"]
    assert detail["objective_names"] == ["asr_keyword", "sbert_prose"]  # set_metric_names, as the dashboard reads it
    study_attrs = attrs(detail["user_attrs"])
    assert study_attrs["mlflow_experiment_id"] == worker.tracker.experiment_id
    assert study_attrs["mlflow_experiment_name"] == "dash"
    assert study_attrs["mlflow_tracking_uri"] == "postgresql+psycopg://alice:***@db.example/mlflow"

    client = MlflowClient(tracking_uri=worker.cfg.tracking.uri)
    assert len(detail["trials"]) == 2 and {trial["state"] for trial in detail["trials"]} == {"Complete"}
    for trial in detail["trials"]:
        trial_attrs = attrs(trial["user_attrs"])
        run = client.get_run(trial_attrs["mlflow_run_id"])  # the link resolves to the trial's MLflow run
        assert run.data.tags["harness.kind"] == "trial"
        assert run.data.tags["harness.trial_number"] == str(trial["number"])
        assert trial_attrs["mlflow_tracking_uri"] == "postgresql+psycopg://alice:***@db.example/mlflow"
    assert "s3cr3t" not in json.dumps(detail)
