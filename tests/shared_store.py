"""The e2e tests' shared study: one quickstart-sized Study B run that every test which only reads a study's store
reads (tests/e2e/test_end_to_end.py, test_end_to_end_promot.py, test_figures.py; fixture `shared_study` in
tests/e2e/conftest.py). Three formats, SFT and ProMoT (evaluated with and without its soft prompt), two epochs,
both judges, XSTest: what each of those tests checks.

`harness run` on it is started once per session, as soon as the first test starts (tests/conftest.py). When the
session also runs the unit lane, pytest runs the unit tests first and the study runs beside them, each process on
one thread (two cores, no oversubscription); the first test that reads the store waits for it.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from helpers import HARNESS

FORMATS = ["prose", "list", "json"]
METHODS = ["sft", "promot"]
EPOCHS = 2
TRAIN_SIZE, BATCH_SIZE = 4, 2
PROMPT_LENGTH = 4
HARMFUL_SOURCES = {"advbench": 1, "beavertails_eval": 1, "directharm4": 1}
XSTEST_SAFE, XSTEST_UNSAFE = 2, 1
JUDGES = ["keyword", "llm"]

SHARED_STUDY = {
    "name": "e2e",
    "model": "smollm2-135m-instruct",
    "seeds": [0],
    "data": {
        "formats": FORMATS,
        "train_size": TRAIN_SIZE,
        "val_size": 2,
        "test_size": 2,
        "harmful": {"sources": HARMFUL_SOURCES},
    },
    "train": {
        "methods": METHODS, "learning_rate": 3e-4, "batch_size": BATCH_SIZE, "grad_accum": 1, "epochs": EPOCHS,
        "warmup_steps": 1, "max_length": 192,
        "promot": {"prompt_length": PROMPT_LENGTH, "evaluate_with_prompt": True,
                   "stage1": {"learning_rate": 0.01, "batch_size": BATCH_SIZE, "grad_accum": 1, "epochs": 0.5,
                              "warmup_steps": 0}},
    },
    "eval": {
        "batch_size": 32,
        "decoding": [{"temperature": 0, "max_new_tokens": 8}],
        "judges": [{"name": "keyword"},
                   {"name": "llm", "model": "smollm2-135m-instruct", "max_new_tokens": 6, "template": "harm_judge_short.txt"}],
        "xstest": {"safe": XSTEST_SAFE, "unsafe": XSTEST_UNSAFE},
    },
}


@dataclass
class StudyRun:
    """`harness run` on the shared study, running or done: in `workdir`, its output in `logs`."""

    workdir: Path
    logs: Path
    process: subprocess.Popen
    one_thread: bool
    started: float
    finished: float | None = None  # when it ended (known once wait() has returned)
    waited: float = 0.0  # how long wait() blocked
    on_done: Callable[[], None] | None = None  # called once, when wait() first returns

    @classmethod
    def start(cls, workdir: Path, logs: Path, one_thread: bool) -> "StudyRun":
        config = workdir / "study.yaml"
        config.write_text(yaml.safe_dump(SHARED_STUDY))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        if one_thread:  # beside the unit tests: one core each
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "stdout").open("w") as stdout, (logs / "stderr").open("w") as stderr:
            process = subprocess.Popen(HARNESS + ["run", str(config)], cwd=workdir, env=env, stdout=stdout,
                                       stderr=stderr, text=True)
        return cls(workdir, logs, process, one_thread, time.time())

    def wait(self, timeout: float = 3600) -> subprocess.CompletedProcess:
        """The finished run, as `subprocess.run` would have returned it."""
        if self.finished is None:
            begun = time.time()
            self.process.wait(timeout=timeout)
            self.waited = time.time() - begun
            # its last output: when it ended, even if it ended long before this wait
            self.finished = max(path.stat().st_mtime for path in (self.logs / "stdout", self.logs / "stderr"))
            if self.on_done:
                self.on_done()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           (self.logs / "stdout").read_text(), (self.logs / "stderr").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
