"""Where the tracking store is: MLflow's SQLite backend inside ./mlruns unless told otherwise.

MLflow 3 defaults to `sqlite:///mlflow.db` in the working directory; we keep the database and the artifact
folder together under `mlruns/` so one folder (git-ignored) holds a study's whole record.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE_DIR = Path("mlruns")


def resolve_tracking_uri(configured: str | None = None, *, create: bool = True) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite file in ./mlruns (made unless `create` is False)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = DEFAULT_STORE_DIR.resolve()
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is not there yet (asking MLflow about it would create it)."""
    return not tracking_uri.startswith("sqlite:///") or Path(tracking_uri.removeprefix("sqlite:///")).is_file()


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """For a local SQLite store, keep artifacts beside the database; servers choose their own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return (store / "artifacts" / experiment_name).resolve().as_uri()


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store, and how to see the training runs there: MLflow 3.17's
    UI takes its view from the sidebar's GenAI / Model training switch (default GenAI), not from the study's
    `mlflow.experimentKind` tag (read by MLflow UIs without that switch)."""
    return (f"mlflow ui --backend-store-uri {tracking_uri}\n"
            '  (then pick "Model training" at the top of its sidebar: the runs, not GenAI traces; the browser remembers)')
