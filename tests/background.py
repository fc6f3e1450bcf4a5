"""Studies the e2e tests only read, built in the background while other tests run (two cores: two processes).

An e2e module declares what it needs in `BACKGROUND_JOBS` (a list of `Job`); tests/conftest.py queues the jobs
that the session's tests read when its first test starts, in the order the modules will run, and one thread
runs them one after another, each step a real CLI process in a fresh folder. A module's fixture then takes its
job's results with `background.result(job_name)` (tests/conftest.py's `background` fixture), waiting if the job
is not done yet.

While jobs run, every process of the session runs torch on one thread (the job's CLI processes, the pytest
process, and the CLI processes the tests start: OMP_NUM_THREADS=1), so the two cores are not oversubscribed;
when the queue is empty the pytest process gets its threads back. Modules that time processes against each
other (heartbeats, a server outage) wait for the queue to drain first (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HARNESS = [sys.executable, "-m", "harness.cli.main"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEP_TIMEOUT = 3600  # seconds; a step still running then is killed (and fails its job)


@dataclass
class Step:
    """One process of a job: `args` run in the job's folder, with `env` added to the environment. A step with
    `check` that exits non-zero ends its job; one without may fail (a process killed on purpose)."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    check: bool = True


def harness(*args: str, check: bool = True, **env: str) -> Step:
    """A step that runs the real `harness` CLI (`python -m harness.cli.main ARGS`)."""
    return Step(HARNESS + list(args), env, check)


def restore_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Job:
    """`steps(workdir)` gives the processes to run, in order, in a fresh folder `workdir`; a checked step that
    fails ends the job (its result is the last one). `readers`: the fixtures that take its result; the job is
    queued only when a collected test uses one of them."""

    name: str
    steps: Callable[[Path], list[Step]]
    readers: tuple[str, ...]
    workdir: Path | None = None
    results: list[subprocess.CompletedProcess] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Runner:
    """Runs queued jobs one at a time on a thread; `result(name)` waits for one."""

    def __init__(self, jobs: list[Job], make_workdir: Callable[[str], Path], one_thread: bool):
        self.jobs = {job.name: job for job in jobs}
        self.queue = list(jobs)
        self.make_workdir = make_workdir
        self.one_thread = one_thread
        self.waited: dict[str, float] = {}
        self._process: subprocess.Popen | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run_all, name="background-studies", daemon=True)

    def start(self) -> None:
        for job in self.queue:  # folders made here, in the main thread (pytest's tmp_path_factory)
            job.workdir = self.make_workdir(job.name)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread.is_alive()

    def drain(self) -> None:
        self._thread.join()

    def result(self, name: str) -> tuple[Path, list[subprocess.CompletedProcess]]:
        job = self.jobs[name]
        begun = time.time()
        while not job.done.wait(timeout=5):
            if not self.busy:
                raise RuntimeError(f"background job {name!r} never ran")
        self.waited[name] = time.time() - begun
        return job.workdir, job.results

    def stop(self) -> None:
        self._stopped = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._thread.join(timeout=60)

    def _run_all(self) -> None:
        for job in self.queue:
            try:
                if not self._stopped:
                    self._run(job)
            finally:
                job.done.set()

    def _run(self, job: Job) -> None:
        job.started = time.time()
        logs = job.workdir.parent / f"{job.workdir.name}-logs"
        logs.mkdir(exist_ok=True)
        for number, step in enumerate(job.steps(job.workdir)):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", **(ONE_THREAD if self.one_thread else {}), **step.env}
            env.pop("MLFLOW_TRACKING_URI", None)
            out, err = logs / f"{number}.stdout", logs / f"{number}.stderr"
            with out.open("w") as stdout, err.open("w") as stderr:
                # Ctrl-C as a user would give it: a suite started in the background (`pytest ... &`, nohup) hands
                # its children SIGINT ignored, and then HARNESS_INTERRUPT_AT's SIGINT would never arrive.
                self._process = subprocess.Popen(step.args, cwd=job.workdir, env=env, stdout=stdout, stderr=stderr,
                                                 text=True, preexec_fn=restore_sigint)
                try:
                    self._process.wait(timeout=STEP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            job.results.append(subprocess.CompletedProcess(step.args, self._process.returncode, out.read_text(),
                                                           err.read_text()))
            if (step.check and self._process.returncode != 0) or self._stopped:
                break
        job.finished = time.time()

    def summary(self) -> list[str]:
        return [f"{job.name}: {job.finished - job.started:.0f}s, waited for {self.waited.get(job.name, 0):.0f}s"
                for job in self.jobs.values() if job.started and job.finished]
