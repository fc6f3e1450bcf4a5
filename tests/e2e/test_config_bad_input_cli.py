"""Bad config input through the real `harness` command (a subprocess each): one stderr line, a non-zero exit,
nothing created. Split from tests/unit/test_config_bad_input.py, which checks the same errors in-process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write

# -- the command line -----------------------------------------------------------------------------------------

CLI = Path(sys.executable).with_name("harness")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(CLI)] if CLI.is_file() else [sys.executable, "-m", "harness.cli.main"]
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_and_nothing_made(done: subprocess.CompletedProcess, cwd: Path, *expected: str) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for part in expected:
        assert part in lines[0], lines[0]
    assert sorted(p.name for p in cwd.iterdir()) == ["exp.yaml"], "the command created files (a run?)"


@pytest.mark.parametrize("content, expected", [
    ("name: x\nmodel: m\n# caf\u00e9\n".encode("latin-1"), ["exp.yaml: line 3 is not UTF-8"]),
    ("name: x\nmodel: m\ntrain:\n  batch_size: 4\n  batch_size: 8\n", ["exp.yaml: line 5", "duplicate key 'batch_size'"]),
    ("name: ../../x\nmodel: m\n", ["name: Value error, study name '../../x'"]),
], ids=["not-utf8", "duplicate-key", "unsafe-name"])
def test_harness_check_prints_one_line(tmp_path, content, expected):
    path = write(tmp_path, content)
    assert_one_line_and_nothing_made(run_cli(["check", str(path)], tmp_path), tmp_path, *expected)


def test_harness_run_with_an_infinite_learning_rate_starts_nothing(tmp_path):
    path = write(tmp_path, "name: x\nmodel: m\ntrain:\n  learning_rate: .inf\n")
    assert_one_line_and_nothing_made(run_cli(["run", str(path)], tmp_path), tmp_path,
                                     "train.learning_rate: Input should be a finite number")
