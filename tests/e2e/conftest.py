"""Fixtures for the end-to-end tests (the real CLI, real stores, real processes). Every test here is marked e2e.

`shared_study` is the session's one quickstart-sized Study B store (tests/shared_store.py), for every test that
only reads a study's store: test_end_to_end.py, test_end_to_end_promot.py and test_figures.py (each lists its
job in BACKGROUND_JOBS, so it is built beside the unit tests). A test that must change a store copies it first
(test_figures.py copies the database), or has a study of its own (test_resume.py, test_sweep_e2e.py,
test_add_to_finished_study.py). When the session ends the shared study's folder must be byte for byte what
`harness run` left.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import fingerprint
from mlflow import MlflowClient

from shared_store import JOB, SHARED_STUDY

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Study:
    workdir: Path  # where `harness run` ran; its store is workdir/mlruns (read it, never write to it)
    done: object  # the CLI's CompletedProcess
    client: MlflowClient
    runs: list

    @property
    def database(self) -> Path:
        return self.workdir / "mlruns" / "mlflow.db"


@pytest.fixture(scope="session")
def shared_study(background):
    """The shared study once `harness run` on it (a background job, tests/shared_store.py) has finished."""
    workdir, (done,) = background.result(JOB.name)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(SHARED_STUDY["name"])
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    before = fingerprint(workdir)
    yield Study(workdir, done, client, runs)
    assert fingerprint(workdir) == before, "a test changed the shared study's folder; copy it instead"
