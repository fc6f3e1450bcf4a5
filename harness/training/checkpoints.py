"""Per-epoch training checkpoints on disk: which are complete, which epoch each is, where to resume.

The Trainer writes `checkpoint-STEP/` with the adapter, optimizer, scheduler and RNG states, and writes
`trainer_state.json` last. A folder whose trainer state is missing or unreadable was cut off mid-write (a
killed job) and is removed before training resumes, so it is never mistaken for a finished epoch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class EpochCheckpoint:
    """An adapter saved at the end of an epoch."""

    epoch: int
    step: int
    path: Path


def _state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None


def _folders(output_dir: Path) -> list[Path]:
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[-1]))


def drop_incomplete(output_dir: Path) -> list[Path]:
    """Remove checkpoint folders a crash left half-written; returns what was removed."""
    removed = [folder for folder in _folders(output_dir) if _state(folder) is None]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def resume_point(output_dir: Path, resumed: bool) -> str | None:
    """Where training starts: the newest complete checkpoint of a resumed run, else None (step 0).

    A run that is not resumed starts clean: checkpoints left by a run the tracking store no longer has
    (a wiped store, a deleted run) are removed, so no epoch of another attempt is evaluated as this one's.
    """
    if not resumed:
        for folder in _folders(output_dir):
            shutil.rmtree(folder)
        return None
    drop_incomplete(output_dir)
    folders = _folders(output_dir)
    return str(folders[-1]) if folders else None


def has_checkpoint(output_dir: Path) -> bool:
    """Whether a complete checkpoint is on disk: if not, training starts from step 0 whatever the store says."""
    return any(_state(folder) is not None for folder in _folders(output_dir))


def epoch_checkpoints(output_dir: Path) -> list[EpochCheckpoint]:
    """Every complete checkpoint under `output_dir`, by step, with the epoch its trainer state records."""
    checkpoints = []
    for folder in _folders(output_dir):
        state = _state(folder)
        if state is None:
            continue
        if not any(folder.glob("adapter_model.*")):
            raise HarnessError(f"checkpoint {folder} has a trainer state but no adapter weights")
        checkpoints.append(EpochCheckpoint(epoch=round(state.get("epoch") or 0), step=int(state["global_step"]), path=folder))
    return checkpoints
