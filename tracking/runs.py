"""The run hierarchy of CONVENTIONS.md: finetune → checkpoint → evaluation, flat `harness.*` tags on each.

We talk to MLflow through `MlflowClient` with explicit run ids instead of the fluent `mlflow.start_run`
stack, so a training loop, a judge and the orchestration can write to different runs without fighting over
one global "active run". A run that raises is marked FAILED with the reason as a tag and the traceback as
an artifact; an interrupted one is KILLED: no half-made run is ever left looking FINISHED.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from tracking.provenance import provenance
from tracking.store import default_artifact_location, resolve_tracking_uri

KINDS = ("sweep", "trial", "finetune", "stage", "checkpoint", "evaluation", "judge_validation")
TAG_PREFIX = "harness."
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → dotted params (`train.lora.r`), the form the MLflow UI can sort and filter by."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class RunHandle:
    """One MLflow run: the few logging calls the harness needs, bound to a run id."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        batch = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        batch = [RunTag(key, str(value)) for key, value in tags.items() if value is not None]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, dict(columns), artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)


class Tracker:
    """One study's MLflow experiment and the runs inside it."""

    def __init__(self, study: str, tracking_uri: str | None = None):
        self.study = study
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(study)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                study, artifact_location=default_artifact_location(self.tracking_uri, study)
            )
        else:
            self.experiment_id = experiment.experiment_id

    @contextmanager
    def run(
        self,
        kind: str,
        name: str,
        tags: Mapping[str, Any],
        *,
        parent: RunHandle | None = None,
        config: Mapping[str, Any] | None = None,
        config_hash: str | None = None,
    ) -> Iterator[RunHandle]:
        """Open a run of `kind` with `harness.*` tags; log its config and provenance; close it honestly."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        all_tags = {f"{TAG_PREFIX}kind": kind, f"{TAG_PREFIX}study": self.study}
        all_tags.update({f"{TAG_PREFIX}{key}": value for key, value in tags.items() if value is not None})
        if config_hash:
            all_tags[f"{TAG_PREFIX}config_hash"] = config_hash
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        info = provenance()
        all_tags[f"{TAG_PREFIX}git_commit"] = info["git"]["commit"]
        all_tags[f"{TAG_PREFIX}version"] = info["packages"].get("harness", "unknown")
        created = self.client.create_run(
            self.experiment_id, run_name=name, tags={key: str(value) for key, value in all_tags.items()}
        )
        handle = RunHandle(self.client, created.info.run_id)
        try:
            if config is not None:
                handle.log_params(flatten(config))
                handle.log_dict(config, "config.json")
            handle.log_dict(info, "provenance.json")
            yield handle
        except KeyboardInterrupt:
            handle.set_tags({f"{TAG_PREFIX}error": "interrupted"})
            self.client.set_terminated(handle.run_id, "KILLED")
            raise
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500] if str(error) else type(error).__name__
            handle.set_tags({f"{TAG_PREFIX}error": reason})
            handle.log_text(traceback.format_exc(), "traceback.txt")
            self.client.set_terminated(handle.run_id, "FAILED")
            raise
        else:
            self.client.set_terminated(handle.run_id, "FINISHED")

    def search(self, filter_string: str = "", max_results: int = 10000) -> list:
        """Runs of this study matching an MLflow filter (e.g. `tags.\"harness.kind\" = 'evaluation'`)."""
        return self.client.search_runs([self.experiment_id], filter_string, max_results=max_results)
