"""A tracking server that goes away for a few seconds loses nothing (issue 8): a real `mlflow server`, stopped
and restarted under a run that is logging, on the same port and database."""

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tracking import Tracker

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_until_up(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} did not come up")


def test_logging_survives_a_server_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # MLflow's own retries, shorter waits
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = [start_server(tmp_path, port)]
    try:
        wait_until_up(url)
        tracker = Tracker("outage", url)
        with tracker.run("finetune", "f", {}, config_hash="h1") as run:
            run.log_metrics({"train_loss": 1.0}, step=1)
            servers[0].terminate()
            servers[0].wait(timeout=30)
            restart = threading.Timer(3.0, lambda: servers.append(start_server(tmp_path, port)))
            restart.start()
            started = time.time()
            run.log_metrics({"train_loss": 0.5}, step=2)  # retried until the server answers again
            outage = time.time() - started
            restart.join()
        assert outage >= 3.0
        done = tracker.finished("finetune", "h1")
        assert done is not None
        history = tracker.client.get_metric_history(done.info.run_id, "train_loss")
        assert sorted((point.step, point.value) for point in history) == [(1, 1.0), (2, 0.5)]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
