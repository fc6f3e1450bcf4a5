"""Every dataset a run reads, as MLflow's own dataset input: the runs table's Datasets column, the run page's
dataset drawer and the lineage MLflow draws all come from these, not from our `datasets.json` artifact.

One MLflow dataset per file (or per hub split) behind a registry name: its name is the registry name, its
source the file's path or the hub id, its digest our sha256 of the file (or the hub commit) cut to the 36
characters MLflow stores, and its profile the file's record count (`num_rows`). MLflow keys a dataset by
(experiment, name, digest), so every run that reads the same bytes points at one dataset, and a changed file
shows as a second digest under the same name.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types import ColSpec, DataType, Schema

DIGEST_LENGTH = 36
"""MLflow's limit on a dataset digest (`MAX_DATASET_DIGEST_SIZE`): the first 36 hex digits of our sha256."""
CONTEXT_TAG = "mlflow.data.context"
"""The input tag the UI shows beside a dataset: what the run used it for."""
TRAINING = "training"
EVALUATION = "evaluation"


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run reads, as MLflow will record it."""

    name: str
    """The registry name (`advbench`, `wikihow`, a YAML's own `my_prompts`, `dolly15k-selfgen`)."""
    source: str
    """The file's absolute path, or the hub dataset id."""
    sha256: str
    """Our checksum: the file's sha256 (as in `harness.dataset_checksums`), or the hub commit."""
    rows: int | None
    """Records in the file (or hub split), before any selection: what the digest describes."""
    columns: tuple[str, ...] = ()
    hub_split: str | None = None
    hub_subset: str | None = None
    """For a hub source: which configuration and split (None: every split)."""

    @property
    def digest(self) -> str:
        return self.sha256[:DIGEST_LENGTH]

    def entity(self) -> Dataset:
        if self.hub_split is not None:
            source = HuggingFaceDatasetSource(self.source, config_name=self.hub_subset, split=self.hub_split,
                                              revision=self.sha256)
        else:
            source = get_dataset_source_from_json(json.dumps({"uri": self.source}), "local")
        schema = Schema([ColSpec(DataType.string, column) for column in self.columns]) if self.columns else None
        config = MetaDataset(source, name=self.name, digest=self.digest, schema=schema).to_dict()
        profile = json.dumps({"num_rows": self.rows}) if self.rows is not None else None
        return Dataset(config["name"], config["digest"], config["source_type"], config["source"],
                       schema=config.get("schema"), profile=profile)


def dataset_inputs(records: Sequence[DatasetRecord], context: str) -> list[DatasetInput]:
    return [DatasetInput(record.entity(), [InputTag(CONTEXT_TAG, context)]) for record in records]


def registry_records(names: Sequence[str], data_dir: str | os.PathLike | None = None) -> list[DatasetRecord]:
    """The MLflow records of registry (or YAML-declared) datasets: one per file the harness checksums."""
    # The registry lives above this layer: imported here, not at the top, so `tracking` loads no data stack.
    from harness.data import registry as data

    found = []
    for name in dict.fromkeys(names):
        # The registry caches each file's sha256 by (path, mtime, size); the records are read again only for bytes
        # not seen before in this process.
        checksums = tuple(sorted(data.checksums(name, data_dir).items()))
        found += _registry_records(name, None if data_dir is None else str(data_dir), checksums)
    return found


@functools.cache
def _registry_records(name: str, data_dir: str | None, known: tuple[tuple[str, str], ...]) -> tuple[DatasetRecord, ...]:
    from harness.data import registry as data

    spec = data.get_spec(name)
    root = data.resolve_data_dir(data_dir)
    checksums = dict(known)
    records = data.load_records(name, data_dir)  # by file (relative path as in `checksums`) or by hub split

    def columns(rows: list) -> tuple[str, ...]:
        return tuple(str(key) for key in rows[0]) if rows and isinstance(rows[0], dict) else ()

    if spec.files:
        found = []
        for rel, sha in checksums.items():
            path = Path(rel) if Path(rel).is_absolute() else Path(root or ".") / rel
            rows = records.get(rel)
            found.append(DatasetRecord(name, str(path.resolve()), sha, len(rows) if rows is not None else None,
                                       columns(rows or [])))
        return tuple(found)
    # A hub dataset: one record for the rows `load_dataset` gave, identified by the commit (a folder read as a
    # hub id has its files hashed instead: one record per file, its rows counted only when it is the only one).
    everything = [row for rows in records.values() for row in rows]
    if not checksums:  # a registry entry that is hub-only records no checksum: its commit identifies it
        checksums = {f"hub:{spec.hub_id}": data.hub_revision(spec)}
    found = []
    for key, sha in checksums.items():
        rows = len(everything) if len(checksums) == 1 else None
        if key.startswith("hub:"):
            found.append(DatasetRecord(name, str(spec.hub_id), sha, rows, columns(everything),
                                       hub_split=spec.hub_split or "all", hub_subset=spec.hub_subset))
        else:
            found.append(DatasetRecord(name, key, sha, rows, columns(everything)))
    return tuple(found)


def file_record(name: str, path: str | os.PathLike, sha256: str) -> DatasetRecord:
    """A JSON-lines file outside the registry (a self-generated set): one record per non-empty line."""
    path = Path(path).resolve()
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = tuple(json.loads(lines[0])) if lines else ()
    return DatasetRecord(name, str(path), sha256, len(lines), columns)
