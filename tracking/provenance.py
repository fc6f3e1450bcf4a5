"""What every run records so any number can be traced and rerun: versions, commit, machine."""

from __future__ import annotations

import functools
import getpass
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TRACKED_PACKAGES = (
    "fine-tuning-safety-harness", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow",
    "optuna", "sentence-transformers", "rouge-score", "pydantic", "gguf", "bitsandbytes", "numpy",
)


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


ARCHIVAL = Path(__file__).resolve().parent / "git_archival.txt"  # `git archive` writes the commit in (.gitattributes)


def archived_commit(path: Path = ARCHIVAL) -> str | None:
    """The commit of a tree exported with `git archive` (no .git: a tarball sent to a GPU machine), else None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"commit: ([0-9a-f]{40})\b", text)
    return match.group(1) if match else None


def _remote_url() -> str | None:
    """Where the repository lives: its `origin` remote, else its first remote, else None (a local clone)."""
    remotes = (_git("remote") or "").split()
    if not remotes:
        return None
    return _git("remote", "get-url", "origin" if "origin" in remotes else remotes[0])


def _branch() -> str | None:
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    return None if branch in (None, "", "HEAD") else branch  # "HEAD": a detached checkout is on no branch


def _program() -> str | None:
    """What MLflow calls the run's source: the script or entry point that ran (`.../bin/harness`)."""
    main = sys.argv[0] if sys.argv else ""
    return str(Path(main).resolve()) if main and Path(main).is_file() else (main or None)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def provenance() -> dict:
    """Computed once per process: package versions, git commit (and whether the tree was dirty), machine."""
    packages = {name: _version(name) for name in TRACKED_PACKAGES}
    packages["harness"] = packages.pop("fine-tuning-safety-harness") or "source"
    accelerator = None
    try:
        import torch

        if torch.cuda.is_available():
            accelerator = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "HEAD")
    # An exported tree has no .git: its commit comes from the archive, and whether it was edited is unknown.
    git = ({"commit": commit, "dirty": bool(status), "branch": _branch(),
            "repo_url": _remote_url()} if commit else
           {"commit": archived_commit() or "unknown", "dirty": None, "branch": None, "repo_url": None})
    return {
        "packages": {name: version for name, version in packages.items() if version},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "accelerator": accelerator or "cpu",
        "git": git,
        "command": " ".join(sys.argv),
        "program": _program(),
    }


SOURCE_JOB_VARIABLES = ("CI", "GITHUB_ACTIONS", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
"""Set by a CI runner or a batch scheduler: a run made there has MLflow source type JOB, else LOCAL."""


def mlflow_source_tags(info: dict, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """MLflow's own source, git and user tags (the keys `mlflow.start_run` would set, which `MlflowClient.create_run`
    does not), from the same provenance as `harness.git_commit`: the UI's Source, Version and User columns and
    the run page's git details read these. A value that is unknown (no remote, an exported tree) is left out."""
    git = info["git"]
    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):  # no login name for this uid (a container)
        user = "unknown"
    tags = {
        "mlflow.user": user,
        "mlflow.source.name": info.get("program") or "<console>",
        "mlflow.source.type": "JOB" if any(environ.get(name) for name in SOURCE_JOB_VARIABLES) else "LOCAL",
        "mlflow.source.git.commit": git["commit"] if git["commit"] != "unknown" else None,
        "mlflow.source.git.branch": git.get("branch"),
        "mlflow.source.git.repoURL": git.get("repo_url"),
        "mlflow.source.git.dirty": None if git.get("dirty") is None else str(git["dirty"]).lower(),
    }
    return {key: value for key, value in tags.items() if value}
