"""Self-generated fine-tuning data (Study A): the base model answers the fine-tuning instructions itself.

Study A found that fine-tuning on the model's *own* answers to Dolly's instructions lowers safety far less than
fine-tuning on the human-written answers: what the data says (and how) matters more than fine-tuning as such.
`self_generate` builds that set: same instructions and inputs, responses from the base model under the study's
decoding. The result is a new dataset version: a JSONL file named by its checksum, and a `dataset` run in the
study's MLflow experiment that records its source, decoding, sha256 and the file itself, so a fine-tune on
`dolly15k-selfgen` always names exactly which answers it learnt from. Rerunning reuses a finished version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from harness.data import registry as data
from harness.config import config_hash
from harness.evals.scoring import generate
from harness.generation.cache import CacheScope
from harness.training.sft import user_message
from tracking.schema import Kind, Tag


@dataclass
class DatasetVersion:
    name: str
    train: list[data.FinetuneRow]
    val: list[data.FinetuneRow]
    path: Path
    sha256: str
    """`data.rows_checksum` of the training rows: the version's identity in fine-tune config hashes."""
    file_sha256: str
    run_id: str


def write_jsonl(path: Path, rows: list[data.FinetuneRow], split: list[str]) -> str:
    """Rows as Alpaca-style JSON lines (instruction, input, output, split); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"instruction": r.instruction, "input": r.input, "output": r.response, "split": part},
                        ensure_ascii=False) for r, part in zip(rows, split)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path, source: str) -> tuple[list[data.FinetuneRow], list[data.FinetuneRow]]:
    train, val = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        row = data.FinetuneRow(record["instruction"], record["input"], record["output"],
                               {"file": path.name, "source": source, "responses": "self-generated"})
        (val if record["split"] == "val" else train).append(row)
    return train, val


def self_generate(runner, name: str) -> DatasetVersion:
    """The `<name>-selfgen` version for a prepared `ExperimentRunner` (base model loaded, no adapter)."""
    cfg = runner.cfg
    settings = cfg.data.finetune.selfgen
    decoding = settings.decoding or cfg.eval.decoding[0]
    source_train, source_val = runner.data.train[name], runner.data.val[name]
    key = f"{name}-selfgen"
    unit = {"kind": "selfgen", "model": cfg.model, "model_state": runner.base_state(), "source": runner.data.set_identity[name],
            "decoding": decoding.model_dump(mode="json", exclude={"repeats"}), "seed": settings.seed}
    digest = config_hash(unit)
    done = runner.tracker.finished(Kind.DATASET, digest)
    if done is not None:
        path = Path(done.data.tags.get(Tag.DATASET_PATH.key, ""))
        if not path.is_file():  # made on another machine: the file is the run's artifact
            folder = Path(cfg.output_dir) / cfg.name / "selfgen" / "downloaded"
            folder.mkdir(parents=True, exist_ok=True)
            path = Path(runner.tracker.client.download_artifacts(done.info.run_id, f"dataset/{path.name}", str(folder)))
        train, val = read_jsonl(path, name)
        return DatasetVersion(key, train, val, path, data.rows_checksum(train), hashlib.sha256(path.read_bytes()).hexdigest(),
                              done.info.run_id)
    rows = [*source_train, *source_val]
    split = ["train"] * len(source_train) + ["val"] * len(source_val)
    tags = {Tag.MODEL: cfg.model, Tag.DATASET: key, Tag.FORMAT: "native", Tag.METHOD: "base", Tag.SOURCE_DATASET: name,
            Tag.RESPONSES: "self-generated", Tag.TEMPERATURE: decoding.temperature, Tag.MIN_P: decoding.min_p}
    with runner.tracker.run(Kind.DATASET, key, tags, config=unit, config_hash=digest) as run:
        responses = generate(runner.eval_model, runner.tokenizer, [user_message(row) for row in rows], decoding,
                             batch_size=cfg.eval.batch_size, seed=settings.seed, desc=f"self-generating {key}",
                             cache=CacheScope(runner.cache, runner.base_state()) if runner.cache is not None else None)
        made = [data.FinetuneRow(row.instruction, row.input, response, {"source": name, "responses": "self-generated"})
                for row, response in zip(rows, responses)]
        train, val = made[: len(source_train)], made[len(source_train) :]
        version_sha = data.rows_checksum(train)
        path = Path(cfg.output_dir) / cfg.name / "selfgen" / f"{key}-{version_sha[:12]}.jsonl"
        file_sha = write_jsonl(path, made, split)
        run.client.log_artifact(run.run_id, str(path), "dataset")
        run.log_metrics({"rows": len(train), "val_rows": len(val),
                         "empty_responses": sum(not response.strip() for response in responses)})
        run.set_tags({Tag.DATASET_VERSION.key: version_sha[:16], Tag.DATASET_SHA256.key: version_sha,
                      Tag.FILE_SHA256.key: file_sha, Tag.DATASET_PATH.key: path.resolve()})
    return DatasetVersion(key, train, val, path.resolve(), version_sha, file_sha, run.run_id)
