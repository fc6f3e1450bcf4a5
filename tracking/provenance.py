"""What every run records so any number can be traced and rerun: versions, commit, machine."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import subprocess
import sys
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
    git = {"commit": commit, "dirty": bool(status)} if commit else {"commit": archived_commit() or "unknown", "dirty": None}
    return {
        "packages": {name: version for name, version in packages.items() if version},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "accelerator": accelerator or "cpu",
        "git": git,
        "command": " ".join(sys.argv),
    }
