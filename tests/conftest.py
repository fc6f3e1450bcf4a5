"""Fixtures shared by several test files, and the order of a session (see `pytest_collection_modifyitems`).

Studies that e2e tests only read are built in the background (tests/background.py) while other tests run: the
unit tests first, beside the first of those studies, then the e2e modules in an order that gives each study time
to finish before the tests that read it.
"""

import os
from pathlib import Path

import pytest
import torch

from background import ONE_THREAD, Runner
from helpers import tiny_llama

TESTS = Path(__file__).resolve().parent
UNIT = TESTS / "unit"

# The e2e modules' order after tests/unit. In-process work first (it runs beside the background studies), then
# the readers of each background study in the order the studies are built, with work that needs no study between
# them. Modules not named run before the last group: those time processes against each other and run only after
# the background queue is empty (QUIET).
E2E_ORDER = [
    "test_promot_stage1.py",
    "test_end_to_end.py", "test_end_to_end_promot.py", "test_figures.py",  # the shared study
    "test_consistency_e2e.py",
    "test_add_to_finished_study.py",
    "test_sweep_e2e.py",
    "test_config_bad_input_cli.py", "test_selfgen.py",
    None,  # e2e modules not named here
    "test_resume.py",
]
QUIET = ["test_sweep_postgres.py", "test_sweep_workers.py", "test_tracking_outage.py"]
BACKGROUND = pytest.StashKey["Runner"]()


@pytest.fixture(autouse=True)
def no_runtime_left_active():
    """A study activates its `runtime:` settings for its process (harness/runtime.py); one test's study must not
    decide how a later test in the same process computes."""
    yield
    from harness import runtime

    runtime.activate(None)


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


def rank(item) -> int:
    if is_unit(item):
        return 0
    order = E2E_ORDER + QUIET
    name = Path(str(item.path)).name
    return 1 + (order.index(name) if name in order else order.index(None))


def pytest_collection_modifyitems(config, items):
    """Unit tests, then the e2e modules in E2E_ORDER, then QUIET. The sort is stable and by module, so each
    module's tests stay together and in their order."""
    items.sort(key=rank)


def jobs_read_by(item) -> list:
    """The background jobs (its module's BACKGROUND_JOBS) whose results the test `item` reads, via its fixtures."""
    declared = getattr(getattr(item, "module", None), "BACKGROUND_JOBS", ())
    return [job for job in declared if set(job.readers) & set(getattr(item, "fixturenames", ()))]


def background_jobs(items) -> list:
    """The jobs that `items` read, once each, in the order they are first read."""
    jobs = {}
    for item in items:
        for job in jobs_read_by(item):
            jobs.setdefault(job.name, job)
    return list(jobs.values())


class Threads:
    """One torch thread in this process and in the processes it starts, while the background jobs run."""

    def __init__(self):
        self.saved_env = {name: os.environ.get(name) for name in ONE_THREAD}
        self.saved_threads = torch.get_num_threads()
        self.active = False

    def one(self):
        os.environ.update(ONE_THREAD)
        torch.set_num_threads(1)
        self.active = True

    def restore(self):
        if not self.active:
            return
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(self.saved_threads)
        self.active = False


THREADS = pytest.StashKey[Threads]()


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """The background studies of this session (a tests/background.py Runner), started at its first test; None
    when no collected module declares one. A module's fixture takes its study with `background.result(name)`."""
    items = request.session.items
    jobs = background_jobs(items)
    if not jobs:
        yield None
        return
    # Beside other tests: one thread each. A session of only their readers just waits, on every thread.
    beside = any(not jobs_read_by(item) for item in items)
    runner = Runner(jobs, tmp_path_factory.mktemp, one_thread=beside)
    threads = Threads()
    if beside:
        threads.one()
    request.config.stash[BACKGROUND] = runner
    request.config.stash[THREADS] = threads
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
        threads.restore()


def pytest_runtest_setup(item):
    """Back to every thread once the background queue is empty; QUIET modules wait for that."""
    runner = item.config.stash.get(BACKGROUND, None)
    if runner is None:
        return
    if Path(str(item.path)).name in QUIET:
        runner.drain()
    if not runner.busy:
        item.config.stash[THREADS].restore()


def pytest_terminal_summary(terminalreporter, config):
    runner = config.stash.get(BACKGROUND, None)
    if runner is not None:
        for line in runner.summary():
            terminalreporter.write_line(f"background study {line}")
