"""Fixtures shared by several test files, and the session's order: tests/unit first, then the e2e modules that
read the shared study (tests/shared_store.py), which runs beside the unit tests, then the other e2e tests."""

from pathlib import Path

import pytest
import torch

import shared_store
from helpers import tiny_llama

UNIT = Path(__file__).resolve().parent / "unit"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU (CI has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_tiny_llama():
    return tiny_llama


def is_unit(item) -> bool:
    return UNIT in Path(str(item.path)).resolve().parents


def reads_shared_study(item) -> bool:
    return "shared_study" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Unit tests, then the e2e modules with a test that reads the shared study, then the other e2e modules. The
    sort is stable and by module, so each module's tests stay together and in their order."""
    group: dict[Path, int] = {}
    for item in items:
        rank = 0 if is_unit(item) else 1 if reads_shared_study(item) else 2
        group[item.path] = min(group.get(item.path, rank), rank)
    items.sort(key=lambda item: group[item.path])


@pytest.fixture(scope="session", autouse=True)
def _shared_study_run(request, tmp_path_factory):
    """Starts `harness run` on the shared study at the session's first test when any test will read it. Beside
    the unit lane it runs on one thread and the unit tests do too, until the study is awaited (`shared_study`)."""
    items = request.session.items
    if not any(reads_shared_study(item) for item in items):
        yield None
        return
    beside_units = any(is_unit(item) for item in items)
    run = shared_store.StudyRun.start(tmp_path_factory.mktemp("shared-study"),
                                      tmp_path_factory.mktemp("shared-study-logs"), one_thread=beside_units)
    threads = torch.get_num_threads()
    if beside_units:
        torch.set_num_threads(1)
        run.on_done = lambda: torch.set_num_threads(threads)
    request.config.stash[STUDY_RUN] = run
    try:
        yield run
    finally:
        run.stop()


STUDY_RUN = pytest.StashKey[shared_store.StudyRun]()


def pytest_terminal_summary(terminalreporter, config):
    run = config.stash.get(STUDY_RUN, None)
    if run is not None and run.finished:
        terminalreporter.write_line(
            f"shared study: `harness run` took {run.finished - run.started:.0f}s "
            f"({'beside the unit tests, one thread' if run.one_thread else 'alone'}); "
            f"the first test that read it waited {run.waited:.0f}s")
