"""The dataset registry: every dataset the two studies use, by name, normalised to a few row types.

Each entry (`DatasetSpec`) names the files of the local copy under the shared data directory
(see `shared/data/README.md` and `MANIFEST.json`) and the HF hub id a user with hub access would
load instead. The local copy always wins; the hub is tried only when a local file is missing and
`HF_HUB_OFFLINE` is not "1". Rows come back as one of three frozen types, whatever the source:

- `HarmfulPrompt`: a prompt of a safety benchmark (AdvBench, BeaverTails, DirectHarm4, ...).
- `FinetuneRow`: an (instruction, input, response) triple for fine-tuning (Dolly, Alpaca, and the
  Study B procedure task built by `harness.data.formats`).
- `Procedure`: a WikiHow title with its steps (the Study B source, see `parse_steps`).

The data directory is resolved as: an explicit `data_dir` argument, else `$HARNESS_DATA_DIR`,
else the first `shared/data` folder found walking up from the working directory and then from
this file (the repo at /work/main finds /work/shared/data). Nothing here writes to it.

Sampling (`harmful_mix`, `split`, `subsample`) uses `random.Random` seeded per call, so the same
seed gives the same rows on every machine and Python version.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from harness.errors import HarnessError, decode_text

_log = logging.getLogger(__name__)

DATA_DIR_ENV = "HARNESS_DATA_DIR"
MANIFEST_NAME = "MANIFEST.json"

Kind = Literal["harmful", "finetune", "procedures", "judge_validation", "reference"]
BadRows = Literal["error", "drop"]
Record = dict[str, Any]
T = TypeVar("T")


class DatasetError(HarnessError):
    """A dataset request that cannot be served: unknown name, wrong kind, bad count, bad checksum."""


class DatasetNotFoundError(DatasetError):
    """A dataset file is missing locally and the hub is offline or failed."""


@dataclass(frozen=True)
class FinetuneRow:
    """One fine-tuning example; `meta` keeps provenance (source file, category, format, ...)."""

    instruction: str
    input: str
    response: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HarmfulPrompt:
    """One prompt of a safety benchmark; `source` is the registry name it came from."""

    prompt: str
    category: str
    source: str


@dataclass(frozen=True)
class Procedure:
    """A WikiHow how-to goal and its steps, numbering already stripped (see `parse_steps`)."""

    title: str
    steps: list[str]


RowFn = Callable[[Record, str], Any]  # (record, origin) -> row, or None to skip the record


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: where a dataset lives and how its records become rows."""

    name: str
    kind: Kind
    hub_id: str | None
    files: tuple[str, ...]
    """Paths relative to the data directory; empty for hub-only datasets."""
    to_row: RowFn
    """Maps one local record (and its relative file path) to a row."""
    hub_to_row: RowFn | None = None
    """Maps one hub record (and its split name) to a row; defaults to `to_row`."""
    notes: str = ""
    columns: tuple[tuple[str, ...], ...] = ()
    """The columns each local file must have (aligned with `files`): a copy without one is an error naming
    the file and the column, never a KeyError or a silently empty field."""
    hub_split: str | None = None
    """Only this split of the hub dataset (None: every split)."""
    hub_subset: str | None = None
    """The hub dataset's configuration (subset) name, when it has several."""
    hub_revision: str | None = None
    """The hub revision to load (None: the newest, resolved to a commit sha when the rows load)."""
    declared_as: str | None = None
    """For a user's dataset, where the YAML declares it (`data.datasets.NAME`): errors name that, not the registry.
    Its `files` are absolute paths (the registry's are relative to the data directory)."""

    def __post_init__(self) -> None:
        if self.columns and len(self.columns) != len(self.files):
            raise ValueError(f"dataset spec {self.name!r}: {len(self.columns)} column lists for {len(self.files)} files")


# --- rows from records -------------------------------------------------------------------------


class MissingColumn(DatasetError):
    """A record without a column its dataset needs: the file is not the dataset it should be."""


def _columns_text(record: Record) -> str:
    return ", ".join(repr(str(key)) for key in record) or "none"


def _first(record: Record, *keys: str) -> Any:
    """The value of the first key present; hub copies name their columns differently."""
    for key in keys:
        if key in record:
            return record[key]
    wanted = f"column {keys[0]!r}" if len(keys) == 1 else f"any of the columns {', '.join(map(repr, keys))}"
    raise MissingColumn(f"no {wanted} (its columns: {_columns_text(record)})")


def _col(record: Record, key: str) -> Any:
    """`record[key]`, or a one-line MissingColumn naming the column (never a bare KeyError)."""
    return _first(record, key)


class BadRow(DatasetError):
    """A record with an empty or non-text field: never passed on as a prompt or an example."""


def _text(value: Any) -> str:
    """A field as text; numbers are written out, anything else that is not text (lists, dicts) is a bad row."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"a field holds {type(value).__name__}, not text")


def _row_problem(row: Any) -> str | None:
    """What makes a normalised row unusable, or None."""
    if isinstance(row, HarmfulPrompt) and not row.prompt.strip():
        return "empty prompt"
    if isinstance(row, FinetuneRow):
        for name in ("instruction", "response"):
            if not getattr(row, name).strip():
                return f"empty {name}"
    if isinstance(row, Procedure) and not (row.title and row.steps):
        return "empty title" if not row.title else "no steps"
    return None


def _harmful(source: str, prompt_keys: tuple[str, ...], category_keys: tuple[str, ...] | None) -> RowFn:
    """A row function for a harmful-prompt source; no category columns means category = source."""

    def to_row(record: Record, origin: str) -> HarmfulPrompt:
        category = _text(_first(record, *category_keys)) if category_keys else source
        return HarmfulPrompt(prompt=_text(_first(record, *prompt_keys)), category=category, source=source)

    return to_row


def _xstest_row(label: str) -> RowFn:
    """XSTest rows of one label; `category` is the prompt type (unsafe types start `contrast_`)."""

    def to_row(record: Record, origin: str) -> HarmfulPrompt | None:
        if _text(_col(record, "label")) != label:  # a missing label column must not select nothing silently
            return None
        return HarmfulPrompt(prompt=_text(_col(record, "prompt")), category=_text(_col(record, "type")), source="xstest")

    return to_row


def _sorry_bench_row(record: Record, origin: str) -> HarmfulPrompt | None:
    """SORRY-Bench keeps each instruction in `turns`; only the unmutated `base` style is a prompt."""
    if record.get("prompt_style", "base") != "base":
        return None
    turns = record.get("turns")
    prompt = turns[0] if isinstance(turns, list) and turns else _first(record, "prompt", "instruction")
    return HarmfulPrompt(prompt=_text(prompt), category=_text(record.get("category", "")), source="sorry_bench")


def _finetune_row(input_key: str, response_key: str, meta_keys: tuple[str, ...] = ()) -> RowFn:
    def to_row(record: Record, origin: str) -> FinetuneRow:
        meta = {"file": origin, **{k: record[k] for k in meta_keys if k in record}}
        return FinetuneRow(
            instruction=_text(_col(record, "instruction")),
            input=_text(record.get(input_key)),
            response=_text(_col(record, response_key)),
            meta=meta,
        )

    return to_row


def _qi_reference_row(record: Record, origin: str) -> FinetuneRow:
    """Qi et al.'s removed rows; `meta["for"]` says which fine-tuning set they were removed from."""
    if origin.endswith(".jsonl") or "context" in record:  # the Dolly file is the JSONL one
        return FinetuneRow(_col(record, "instruction"), _col(record, "context"), _col(record, "response"),
                           {"for": "dolly15k"})
    return FinetuneRow(_col(record, "instruction"), _col(record, "input"), _col(record, "output"), {"for": "alpaca"})


def _procedure_row(record: Record, origin: str) -> Procedure:
    title = " ".join(_text(_first(record, "title")).split())
    return Procedure(title=title, steps=parse_steps(_text(_first(record, "result", "results", "summary"))))


def _record_row(record: Record, origin: str) -> Record:
    return record


# A step marker is "N." / "N.." / "N," / "N)" (not followed by a digit, so "1.5 cups" survives),
# a bare "N" followed by two or more spaces, or a bullet (•, ∙, ·, *, -) followed by whitespace.
_STEP_MARKER = re.compile(r"^\s*(?:\d{1,3}\s*[.,)]+(?!\d)|\d{1,3}(?=\s{2})|[•∙·*-](?=\s|$))")


def parse_steps(result_text: str) -> list[str]:
    """The steps of a WikiHow numbered list: one per non-blank line, marker stripped, whitespace normalised.

    Whitespace normalisation collapses every run of Unicode whitespace (NBSP included) to one
    space and trims the ends, so the steps are byte-stable inputs for `harness.data.formats`.
    """
    steps = []
    for line in result_text.splitlines():
        step = " ".join(_STEP_MARKER.sub("", line, count=1).split())
        if step:
            steps.append(step)
    return steps


# --- the registry ------------------------------------------------------------------------------

_DOLLY_SHARDS = tuple(
    f"databricks_dolly_15k/{shard}.json"
    for shard in ("global_test", "local_training_0", "local_training_1", "local_training_2",
                  "local_training_3", "public_training")
)  # fmt: skip

_SPECS = (
    DatasetSpec(
        "advbench", "harmful", "walledai/AdvBench", ("advbench/harmful_behaviors.csv",),
        _harmful("advbench", ("goal", "prompt"), None),
        notes="520 harmful behaviours (goal column); harmful_strings.csv is not a prompt set",
        columns=(("goal",),),
    ),
    DatasetSpec(
        "beavertails_eval", "harmful", "PKU-Alignment/BeaverTails-Evaluation",
        ("beavertails_evaluation/BeaverTails-Evaluation.csv",),
        _harmful("beavertails_eval", ("prompt",), ("category",)),
        notes="700 prompts, 14 categories x 50",
        columns=(("prompt", "category"),),
    ),
    DatasetSpec(
        "directharm4", "harmful", "vfleaking/DirectHarm4", ("directharm4/directHarm4.csv",),
        _harmful("directharm4", ("Goal",), ("Category",)),
        hub_to_row=_harmful("directharm4", ("instruction", "Goal"), ("category", "Category")),
        notes="400 prompts: malware, drug, phishing, disinfo x 100",
        columns=(("Goal", "Category"),),
    ),
    DatasetSpec(
        "gsm_danger", "harmful", "vfleaking/GSM-Danger", (),
        _harmful("gsm_danger", ("prompt", "instruction", "question", "goal", "text"), None),
        notes="hub only: no local copy",
    ),
    DatasetSpec(
        "sorry_bench", "harmful", "sorry-bench/sorry-bench-202503", (), _sorry_bench_row,
        notes="hub only, gated (accept the licence on the hub); base prompt style only",
    ),
    DatasetSpec(
        "xstest", "harmful", "walledai/XSTest", ("xstest/xstest_prompts.csv",), _xstest_row("unsafe"),
        notes="load_harmful gives the 200 unsafe (contrast_*) prompts; xstest_prompts('safe') the 250 safe",
        columns=(("prompt", "type", "label"),),
    ),
    DatasetSpec(
        "wikihow", "procedures", "b-mc2/wikihow_lists",
        ("wikihow_lists_summary/wikihow_lists_summary_first3000.csv",), _procedure_row,
        notes="first 3,000 procedures (title, numbered step list); stands in for WikiSum",
        columns=(("title", "result"),),
    ),
    DatasetSpec(
        "dolly15k", "finetune", "databricks/databricks-dolly-15k", _DOLLY_SHARDS,
        _finetune_row("context", "response", ("category",)),
        notes="15,011 rows from 6 shards (upstream order lost); remove_safety gives 14,624",
        columns=(("instruction", "context", "response", "category"),) * len(_DOLLY_SHARDS),
    ),
    DatasetSpec(
        "alpaca", "finetune", "tatsu-lab/alpaca", ("alpaca_random9k/random_9k.json",),
        _finetune_row("input", "output"),
        notes="local copy is the 9,229-row AlpaGasus random sample; the hub has all 52,002 rows",
        columns=(("instruction", "input", "output"),),
    ),
    DatasetSpec(
        "qi2024_safety_removed", "reference", None,
        ("qi2024_safety_removed/databricks-dolly-15k-safety-only.jsonl",
         "qi2024_safety_removed/alpaca_data_safety_only.json"),
        _qi_reference_row,
        notes="rows Qi et al. 2024 removed from Dolly (387) and Alpaca (1,904); used by remove_safety",
        columns=(("instruction", "context", "response"), ("instruction", "input", "output")),
    ),
    DatasetSpec(
        "beavertails_30k_test", "judge_validation", None,
        ("beavertails_30k_test/0_A_beaver_tails.json",), _record_row,
        notes="WildGuard-format rows (instruction, input, output), label after 'Response: '; "
              "the hub's PKU-Alignment/BeaverTails has another schema, so no hub fallback",
        columns=(("input", "output"),),
    ),
    DatasetSpec(
        "pku_saferlhf_test2k", "judge_validation", None,
        ("pku_saferlhf_test2k/0_9_safe_rlhf.json",), _record_row,
        notes="2,000 rows, 1,682 distinct pairs, 28 with conflicting labels: load_judge_set dedupes",
        columns=(("input", "output"),),
    ),
    DatasetSpec(
        "xstest_resp_wildguard", "judge_validation", None,
        ("xstest_resp_wildguard/0_6_xstest_response_harmful.json",
         "xstest_resp_wildguard/0_7_xstest_response_refusal.json"),
        _record_row,
        notes="XSTest-Resp: harmfulness (446) and refusal (449) labels",
        columns=(("input", "output"),) * 2,
    ),
    DatasetSpec(
        "gptfuzz_labeled_responses", "judge_validation", None,
        ("gptfuzz_labeled_responses/train.csv", "gptfuzz_labeled_responses/evaluate.csv",
         "gptfuzz_labeled_responses/question_list.csv"),
        _record_row,
        notes="GPTFuzzer jailbreak outcomes, label 1 = jailbroken",
        columns=(("question", "Response", "label"),) * 2 + (("index", "text"),),
    ),
    DatasetSpec(
        "xstest_completions_human", "judge_validation", None,
        tuple(f"xstest_completions_human/xstest_v2_completions_{m}.csv"
              for m in ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")),
        _record_row,
        notes="XSTest v2 completions with human refusal labels",
        columns=(("prompt", "type", "completion", "agreement", "final_label"),) * 5,
    ),
)  # fmt: skip

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


_DECLARED: dict[str, DatasetSpec] = {}


def declare(specs: Sequence[DatasetSpec]) -> None:
    """Make a study's own datasets (the YAML's `data.datasets`, see `harness.data.user`) nameable like registry
    entries; replaces the previous study's, so one study's files never leak into the next."""
    clash = [spec.name for spec in specs if spec.name in DATASETS]
    if clash:
        raise DatasetError(f"data.datasets.{clash[0]}: the registry has a dataset of that name already")
    _DECLARED.clear()
    _DECLARED.update({spec.name: spec for spec in specs})


def get_spec(name: str, kinds: Sequence[Kind] | None = None) -> DatasetSpec:
    """The registry entry (or declared dataset) for `name`, checked to be one of `kinds` when given."""
    spec = DATASETS.get(name) or _DECLARED.get(name)
    if spec is None:
        declared = f"; declared in data.datasets: {', '.join(sorted(_DECLARED))}" if _DECLARED else ""
        raise DatasetError(f"unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))}{declared} "
                           "(a file or hub dataset of your own is declared under data.datasets)")
    if kinds is not None and spec.kind not in kinds:
        where = f"{spec.declared_as}.kind" if spec.declared_as else f"dataset '{name}'"
        raise DatasetError(f"{where}: '{name}' is a {spec.kind} dataset, expected {' or '.join(kinds)}")
    return spec


def describe(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One dict per registry entry, for the `harness datasets` listing."""
    root = resolve_data_dir(data_dir)
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "hub_id": spec.hub_id,
            "files": list(spec.files),
            "local": bool(spec.files) and root is not None and all((root / f).is_file() for f in spec.files),
            "notes": spec.notes,
        }
        for spec in _SPECS
    ]


# --- locating and reading files ----------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: argument, else $HARNESS_DATA_DIR, else the nearest `shared/data` above."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


_CORRUPT = "the file is truncated or corrupt: restore it from the original"


def _read_csv(path: Path, text: str) -> list[Record]:
    """CSV records; a quoted field never closed, or a record with more or fewer fields than the header, is an
    error (a file cut mid-record looks like that) instead of a row with missing values."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    records = []
    try:
        for record in reader:
            if None in record or None in record.values():
                width = len(reader.fieldnames or ())
                found = width + len(record.get(None) or ()) - sum(value is None for value in record.values())
                raise DatasetError(f"{path} line {reader.reader.line_num}: a record has {found} field(s) but the "
                                   f"header has {width}; {_CORRUPT}")
            records.append(record)
    except csv.Error as error:
        raise DatasetError(f"{path} line {reader.reader.line_num}: not valid CSV ({error}); {_CORRUPT}") from None
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                                       f"{_CORRUPT}") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                           f"{_CORRUPT}") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON array of records, found a JSON {type(records).__name__}")
    return records


def _read_parquet(path: Path, raw: bytes) -> list[Record]:
    """Parquet records through pyarrow (installed with `datasets`); nested columns (a chat's list of turns) come
    back as Python lists and dicts."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(pyarrow.BufferReader(raw)).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        reason = " ".join(str(error).split())[:160]
        raise DatasetError(f"{path}: not a readable Parquet file ({reason}); {_CORRUPT}") from None


def _read_file(path: Path) -> list[Record]:
    """Records of one local file, by extension; files are opened read-only.

    Whatever is wrong with the file (unreadable, not UTF-8, cut short, not a list of records, empty) is one
    line naming it and where, never a traceback from the parser.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error.strerror or error})") from None
    if path.suffix.lower() == ".parquet":
        records = _read_parquet(path, raw)
    elif path.suffix.lower() == ".csv":
        records = _read_csv(path, decode_text(path, raw, "utf-8-sig", DatasetError))
    else:
        records = _read_json(path, decode_text(path, raw, "utf-8", DatasetError))
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DatasetError(f"{path} record {number}: expected an object of named fields, found a "
                               f"{type(record).__name__}")
    if not records:
        raise DatasetError(f"{path}: holds no records (an empty file, or one cut short before its first record)")
    return records


def _check_columns(spec: DatasetSpec, index: int, path: Path, records: list[Record]) -> None:
    """Every record of a local file has the columns its dataset needs; the first one without is named."""
    if not spec.columns:
        return
    required = spec.columns[index]
    for number, record in enumerate(records, 1):
        missing = [column for column in required if column not in record]
        if missing:
            where = f"{path}" if path.suffix == ".csv" else f"{path} record {number}"
            raise MissingColumn(
                f"{where}: missing column {missing[0]!r} (dataset '{spec.name}' needs {', '.join(required)}; "
                f"found {_columns_text(record)})"
            )


def _missing_message(spec: DatasetSpec, root: Path | None, rel: str | None, hub_note: str) -> str:
    if spec.declared_as:
        where = f"file not found: {rel} (relative paths start at {Path.cwd()})" if rel else hub_note.rstrip("; ")
        return " ".join(f"{spec.declared_as}: {where}".splitlines())
    if rel is None:
        where = f"has no local copy (hub only: {spec.hub_id})"
    elif root is None:
        where = (f"needs {rel} but no data directory was found (no shared/data above {Path.cwd()} "
                 f"or the harness package)")
    else:
        where = f"file not found: {root / rel}"
    fix = f"set {DATA_DIR_ENV} or `data_dir:` to the folder holding {rel}" if rel else (
        "unset HF_HUB_OFFLINE and log in to the HF hub")
    return " ".join(f"dataset '{spec.name}' {where}; {hub_note}{fix}".splitlines())


DROPPED_ROWS: dict[str, int] = {}
"""Dataset name → records `data.bad_rows: drop` skipped at its latest load in this process; the runner
records it on every run (`harness.rows_dropped`), so a number never rests on rows silently left out."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off ($HF_HUB_OFFLINE, read as huggingface_hub reads it): models
    and datasets then load only from local copies, and say so instead of trying the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_records(spec: DatasetSpec, root: Path | None, rel: str | None) -> dict[str, list[Record]]:
    """Records per split from the HF hub, or a one-line DatasetNotFoundError."""
    if spec.hub_id is None:
        raise DatasetNotFoundError(_missing_message(spec, root, rel, "it is not on the HF hub; "))
    local_folder = Path(spec.hub_id).expanduser().is_dir()  # `datasets` reads a folder of data files offline too
    if spec.declared_as and hub_offline() and not local_folder:
        raise DatasetNotFoundError(f"{spec.declared_as}.hub: {spec.hub_id} cannot be loaded: HF_HUB_OFFLINE=1 (unset "
                                   "it, or download the dataset and declare its file as path)")
    if hub_offline() and not local_folder:
        hint = f"HF_HUB_OFFLINE=1 so the hub copy {spec.hub_id} was not tried; " if rel else "HF_HUB_OFFLINE=1; "
        raise DatasetNotFoundError(_missing_message(spec, root, rel, hint))
    try:
        import datasets  # imported late: slow, and only needed without a local copy

        # Only what the spec sets: a registry entry loads the whole dataset, as `load_dataset(id)` does.
        options = {key: value for key, value in (("split", spec.hub_split), ("revision", spec.hub_revision)) if value}
        subset = (spec.hub_subset,) if spec.hub_subset else ()
        loaded = datasets.load_dataset(spec.hub_id, *subset, **options)
    except Exception as exc:  # any hub failure (network, auth, gating, no such split) becomes the same one-liner
        reason = " ".join(str(exc).split())[:200]
        hint = f"loading {spec.hub_id} from the HF hub failed ({type(exc).__name__}: {reason}); "
        raise DatasetNotFoundError(_missing_message(spec, root, rel, hint)) from exc
    splits = loaded.items() if isinstance(loaded, Mapping) else [(spec.hub_split or "train", loaded)]
    return {f"hub:{spec.hub_id}:{split}": [dict(r) for r in rows] for split, rows in splits}


def hub_revision(spec: DatasetSpec) -> str:
    """The commit a hub dataset's rows come from, recorded with its checksums: the pinned revision when it is a
    full commit sha, else the hub's answer for the revision (or 'main'); a local folder read as a hub id has
    its files hashed instead."""
    if spec.hub_revision and re.fullmatch(r"[0-9a-f]{40}", spec.hub_revision):
        return spec.hub_revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(spec.hub_id, revision=spec.hub_revision).sha or "unknown"
    except Exception as exc:  # offline or private: the rows loaded, but their commit cannot be named
        _log.warning("dataset %s: the commit of %s could not be resolved (%s)", spec.name, spec.hub_id, exc)
        return f"{spec.hub_revision or 'main'} (unresolved)"


def _locate(root: Path | None, rel: str) -> Path | None:
    """Where a spec's file is: a declared dataset's absolute path as it is, a registry file under the data
    directory (None when there is none)."""
    if Path(rel).is_absolute():
        return Path(rel)
    return None if root is None else root / rel


def _records(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> tuple[dict[str, list[Record]], bool]:
    """Records per file (local) or per split (hub), and whether they came from the hub."""
    root = resolve_data_dir(data_dir)
    located = {rel: _locate(root, rel) for rel in spec.files}
    missing = next((rel for rel, path in located.items() if path is None or not path.is_file()), None)
    if spec.files and missing is None:
        by_file = {}
        for index, (rel, path) in enumerate(located.items()):
            by_file[rel] = _read_file(path)
            _check_columns(spec, index, path, by_file[rel])
        return by_file, False
    if spec.declared_as and spec.files:  # a file of the user's own: no hub copy to fall back on
        raise DatasetNotFoundError(_missing_message(spec, root, missing, ""))
    return _hub_records(spec, root, missing), True


def load_records(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, list[Record]]:
    """Raw records of any dataset, keyed by relative file path (or `hub:ID:SPLIT`): for judge sets."""
    return _records(get_spec(name), data_dir)[0]


def _rows(spec: DatasetSpec, data_dir: str | os.PathLike | None, row_fn: RowFn | None = None,
          bad_rows: BadRows = "error") -> list[Any]:
    """Rows of a dataset in file (or split) order; `row_fn` overrides the spec's mapping.

    A record with an empty or non-text field is an error naming its file and row, or, with
    `bad_rows="drop"`, skipped and counted in a logged warning: it is never passed on.
    """
    by_origin, from_hub = _records(spec, data_dir)
    to_row = row_fn or ((spec.hub_to_row or spec.to_row) if from_hub else spec.to_row)
    rows, dropped = [], 0
    for origin, records in by_origin.items():
        for index, record in enumerate(records):
            try:
                row = to_row(record, origin)
                problem = _row_problem(row) if row is not None else None
            except BadRow as error:
                row, problem = None, str(error)
            except MissingColumn as error:  # hub copies are not column-checked up front
                raise MissingColumn(f"{origin} record {index + 1}: {error}") from None
            except DatasetError as error:  # a record that cannot be used as it is, whatever bad_rows says
                raise DatasetError(f"{origin} record {index + 1}: {error}") from None
            except KeyError as error:
                raise MissingColumn(f"{origin} record {index + 1}: no column {error.args[0]!r} "
                                    f"(its columns: {_columns_text(record)})") from None
            if problem is None:
                if row is not None:
                    rows.append(row)
            elif bad_rows == "drop":
                dropped += 1
            else:
                raise DatasetError(f"{origin} record {index + 1}: {problem} (data.bad_rows: drop skips such rows)")
    DROPPED_ROWS[spec.name] = dropped
    if dropped:
        _log.warning("dataset %s: dropped %d record(s) with empty or non-text fields", spec.name, dropped)
    return rows


# --- typed loaders -----------------------------------------------------------------------------


def load_harmful(name: str, data_dir: str | os.PathLike | None = None, bad_rows: BadRows = "error") -> list[HarmfulPrompt]:
    """The prompts of one harmful benchmark, in file order."""
    return _rows(get_spec(name, ("harmful",)), data_dir, bad_rows=bad_rows)


def xstest_prompts(label: Literal["safe", "unsafe"], data_dir: str | os.PathLike | None = None,
                   bad_rows: BadRows = "error") -> list[HarmfulPrompt]:
    """XSTest's 250 safe prompts (over-refusal probes) or its 200 unsafe contrast prompts."""
    if label not in ("safe", "unsafe"):
        raise DatasetError(f"xstest label must be 'safe' or 'unsafe', got '{label}'")
    return _rows(get_spec("xstest"), data_dir, row_fn=_xstest_row(label), bad_rows=bad_rows)


def load_finetune(name: str, data_dir: str | os.PathLike | None = None, bad_rows: BadRows = "error") -> list[FinetuneRow]:
    """Fine-tuning rows (or Qi et al.'s reference rows), in file order, shards concatenated."""
    return _rows(get_spec(name, ("finetune", "reference")), data_dir, bad_rows=bad_rows)


def load_procedures(data_dir: str | os.PathLike | None = None, name: str = "wikihow",
                    bad_rows: BadRows = "error") -> list[Procedure]:
    """The Study B procedures, in file order."""
    return _rows(get_spec(name, ("procedures",)), data_dir, bad_rows=bad_rows)


def _row_key(row: FinetuneRow) -> tuple[str, str, str]:
    return (row.instruction, row.input, row.response)


QI_CLEANED = ("dolly15k", "alpaca")
"""The benign sets Qi et al. 2024 removed safety-related rows from (`qi2024_safety_removed`)."""


def remove_safety(
    name: str, rows: Sequence[FinetuneRow], data_dir: str | os.PathLike | None = None
) -> list[FinetuneRow]:
    """Drop the rows Qi et al. 2024 removed as safety-related (verbatim instruction+input+response).

    This rebuilds their "no-safety" benign sets: Dolly 15,011 -> 14,624; order is preserved.
    """
    if name not in QI_CLEANED:
        raise DatasetError(f"remove_safety knows only dolly15k and alpaca, not '{name}'")
    removed = {_row_key(r) for r in load_finetune("qi2024_safety_removed", data_dir) if r.meta["for"] == name}
    return [row for row in rows if _row_key(row) not in removed]


# --- judge-validation sets ---------------------------------------------------------------------
#
# Human-labelled (prompt, response, label) sets that measure how far a judge agrees with people. Each set
# says which question its humans answered (`task`): "harm" (is the response harmful?) or "refusal" (did the
# model comply or refuse?), and maps every label value it uses to the positive class explicitly: harmful
# for harm sets, compliance for refusal sets (compliance with an unsafe request is what ASR and the
# fulfilment rate count). A label value missing from the mapping is an error, never a silent default.

JudgeTask = Literal["harm", "refusal"]
POSITIVE_CLASS: dict[str, str] = {"harm": "harmful", "refusal": "compliance"}

_WILDGUARD_PREFIX, _WILDGUARD_SPLIT = "Human user:\n", "\n\nAI assistant:\n"


@dataclass(frozen=True)
class LabelledPair:
    """One human-labelled pair; `positive` is True for harmful (harm sets) or compliance (refusal sets)."""

    prompt: str
    response: str
    positive: bool
    label: str
    """The set's own label value, e.g. `harmful`, `1`, `3_partial_refusal`."""
    origin: str
    """The file the row came from."""
    meta: dict = field(default_factory=dict)


PairFn = Callable[[dict[str, list[Record]]], list[tuple[str, str, str, str, dict]]]
"""records by file -> (prompt, response, raw label, origin, meta) per labelled row."""


@dataclass(frozen=True)
class JudgeSetSpec:
    """A judge-validation set: which registry dataset it reads, its task and its label mapping."""

    name: str
    dataset: str
    task: JudgeTask
    labels: Mapping[str, bool]
    """Every label value the set uses -> whether it is the positive class."""
    pairs: PairFn
    notes: str = ""


def _split_wildguard(text: str, origin: str) -> tuple[str, str]:
    """GuardReasoner/WildGuard `input`: 'Human user:\\n{prompt}\\n\\nAI assistant:\\n{response}\\n\\n'."""
    if not text.startswith(_WILDGUARD_PREFIX) or _WILDGUARD_SPLIT not in text:
        raise DatasetError(f"{origin}: input is not in the 'Human user: ... AI assistant: ...' format: {text[:60]!r}")
    body = text[len(_WILDGUARD_PREFIX):].removesuffix("\n\n")
    prompt, response = body.split(_WILDGUARD_SPLIT, 1)
    return prompt, response


def _wildguard_pairs(file: str, after: str | None) -> PairFn:
    """Rows of one WildGuard-format file; the label is `output` itself or the word after `after`."""

    def pairs(by_file: dict[str, list[Record]]) -> list[tuple[str, str, str, str, dict]]:
        rows = []
        for record in by_file[file]:
            output = _text(record["output"])
            if after is None:
                label = output.strip()
            else:
                found = re.search(re.escape(after) + r"\s*(\S+)", output)
                label = found.group(1) if found else output.strip()
            rows.append((*_split_wildguard(_text(record["input"]), file), label, file, {}))
        return rows

    return pairs


def _gptfuzz_pairs(by_file: dict[str, list[Record]]) -> list[tuple[str, str, str, str, dict]]:
    """GPTFuzzer rows; `question` indexes question_list.csv. The jailbreak template wrapped around the
    question was not recorded, so the judge sees the bare question (as our own benchmarks do)."""
    questions = {_text(r["index"]).strip(): _text(r["text"]) for r in by_file["gptfuzz_labeled_responses/question_list.csv"]}
    rows = []
    for file in ("gptfuzz_labeled_responses/train.csv", "gptfuzz_labeled_responses/evaluate.csv"):
        for record in by_file[file]:
            index = _text(record["question"]).strip()
            if index not in questions:
                raise DatasetError(f"{file}: question {index!r} is not in question_list.csv")
            rows.append((questions[index], _text(record["Response"]), _text(record["label"]).strip(), file,
                         {"question": int(index)}))
    return rows


def _xstest_completion_pairs(by_file: dict[str, list[Record]]) -> list[tuple[str, str, str, str, dict]]:
    rows = []
    for file, records in by_file.items():
        model = file.rsplit("_", 1)[-1].removesuffix(".csv")
        for r in records:
            meta = {"model": model, "type": _text(r["type"]), "annotators_agree": _text(r["agreement"]) == "TRUE"}
            rows.append((_text(r["prompt"]), _text(r["completion"]), _text(r["final_label"]).strip(), file, meta))
    return rows


_HARM_LABELS = {"harmful": True, "unharmful": False}

_JUDGE_SETS = (
    JudgeSetSpec(
        "beavertails_30k_test", "beavertails_30k_test", "harm", _HARM_LABELS,
        _wildguard_pairs("beavertails_30k_test/0_A_beaver_tails.json", after="Response:"),
        notes="BeaverTails 30k_test QA pairs, crowd safety meta-label",
    ),
    JudgeSetSpec(
        "pku_saferlhf_test2k", "pku_saferlhf_test2k", "harm", _HARM_LABELS,
        _wildguard_pairs("pku_saferlhf_test2k/0_9_safe_rlhf.json", after="Response:"),
        notes="PKU-SafeRLHF test sample; duplicates merged and conflicting pairs dropped",
    ),
    JudgeSetSpec(
        "xstest_resp_harm", "xstest_resp_wildguard", "harm", _HARM_LABELS,
        _wildguard_pairs("xstest_resp_wildguard/0_6_xstest_response_harmful.json", after=None),
        notes="WildGuard XSTest-Resp, response harmfulness",
    ),
    JudgeSetSpec(
        "xstest_resp_refusal", "xstest_resp_wildguard", "refusal", {"compliance": True, "refusal": False},
        _wildguard_pairs("xstest_resp_wildguard/0_7_xstest_response_refusal.json", after=None),
        notes="WildGuard XSTest-Resp, refusal vs compliance (safe and unsafe prompts)",
    ),
    JudgeSetSpec(
        "gptfuzz_labeled_responses", "gptfuzz_labeled_responses", "harm", {"1": True, "0": False},
        _gptfuzz_pairs,
        notes="GPTFuzzer jailbreak outcomes (1 = jailbroken = harmful); train and evaluate files together",
    ),
    JudgeSetSpec(
        "xstest_completions_human", "xstest_completions_human", "refusal",
        # A partial refusal mixes refusing and complying; it is not the full compliance the positive
        # class stands for, so it counts as a refusal (XSTest's own refusal rate counts both refusals).
        {"1_full_compliance": True, "2_full_refusal": False, "3_partial_refusal": False},
        _xstest_completion_pairs,
        notes="XSTest v2 completions of 5 models, final human label; partial refusal counts as refusal",
    ),
)  # fmt: skip

JUDGE_SETS: dict[str, JudgeSetSpec] = {spec.name: spec for spec in _JUDGE_SETS}


@dataclass(frozen=True)
class JudgeSet:
    """A loaded judge-validation set: its rows (deduplicated) and what loading did to them."""

    spec: JudgeSetSpec
    rows: list[LabelledPair]
    report: dict[str, Any]
    """rows_read, duplicates_merged, conflicting_pairs, conflicting_rows_dropped, rows, label_counts."""


def judge_set_names(requested: Sequence[str] | None = None) -> list[str]:
    """Resolve set names: None or "all" = every set; a registry dataset name = every set built from it."""
    if not requested or "all" in requested:
        return list(JUDGE_SETS)
    names: list[str] = []
    for name in requested:
        expanded = [name] if name in JUDGE_SETS else [s.name for s in _JUDGE_SETS if s.dataset == name]
        if not expanded:
            raise DatasetError(f"unknown judge-validation set '{name}'; known: {', '.join(JUDGE_SETS)}")
        names.extend(n for n in expanded if n not in names)
    return names


def load_judge_set(name: str, data_dir: str | os.PathLike | None = None) -> JudgeSet:
    """The labelled pairs of one judge-validation set, in file order, with duplicates resolved.

    An exact (prompt, response) pair that occurs more than once is kept once when its labels agree
    and dropped entirely when they conflict (the humans disagreed, so it cannot score a judge);
    `report` says how many of each. PKU-SafeRLHF's 2,000 rows hold 1,682 distinct pairs, 28 of
    them conflicting, because one response can appear in several of its comparison pairs.
    """
    if name not in JUDGE_SETS:
        raise DatasetError(f"unknown judge-validation set '{name}'; known: {', '.join(JUDGE_SETS)}")
    spec = JUDGE_SETS[name]
    raw = spec.pairs(load_records(spec.dataset, data_dir))
    labels_of: dict[tuple[str, str], set[str]] = {}
    for prompt, response, label, origin, _meta in raw:
        if label not in spec.labels:
            raise DatasetError(
                f"judge set '{name}': {origin} has label {label!r}, which the set's mapping "
                f"({', '.join(spec.labels)}) does not cover"
            )
        labels_of.setdefault((prompt, response), set()).add(label)
    conflicting = {key for key, labels in labels_of.items() if len(labels) > 1}
    rows, seen = [], set()
    for prompt, response, label, origin, meta in raw:
        key = (prompt, response)
        if key in conflicting or key in seen:
            continue
        seen.add(key)
        rows.append(LabelledPair(prompt, response, spec.labels[label], label, origin, meta))
    if not rows:
        raise DatasetError(f"judge set '{name}' has no usable rows")
    label_counts: dict[str, int] = {}
    for row in rows:
        label_counts[row.label] = label_counts.get(row.label, 0) + 1
    report = {
        "rows_read": len(raw),
        "duplicates_merged": len(raw) - len(rows) - sum(1 for r in raw if (r[0], r[1]) in conflicting),
        "conflicting_pairs": len(conflicting),
        "conflicting_rows_dropped": sum(1 for r in raw if (r[0], r[1]) in conflicting),
        "rows": len(rows),
        "label_counts": label_counts,
    }
    return JudgeSet(spec, rows, report)


# --- sampling ----------------------------------------------------------------------------------


def _check_count(n: Any, available: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DatasetError(f"{what}: count must be a non-negative integer or null, got {n!r}")
    if n > available:
        raise DatasetError(f"{what}: asked for {n} rows but only {available} are available")
    return n


def subsample(rows: Sequence[T], n: int, seed: int, what: str = "subsample") -> list[T]:
    """`n` rows drawn without replacement, kept in their original order (stable under re-sorting).

    `what` names the count in an error, e.g. the config field it came from (`eval.xstest.safe`).
    """
    n = _check_count(n, len(rows), what)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def harmful_mix(
    counts: Mapping[str, int | None], seed: int, data_dir: str | os.PathLike | None = None, bad_rows: BadRows = "error"
) -> list[HarmfulPrompt]:
    """A harmful prompt set mixed from several benchmarks, e.g. Study B's AdvBench+BeaverTails+....

    `counts[source]` is None for every row or an int for a seeded subsample. Sources appear in
    name order and keep file order within, so the result does not depend on the mapping's order.
    Each source is drawn with its own seed derived from (seed, source), so adding a source never
    changes which prompts another source contributes.
    """
    prompts: list[HarmfulPrompt] = []
    for source in sorted(counts):
        rows = load_harmful(source, data_dir, bad_rows)
        n = counts[source]
        if n is None:
            prompts.extend(rows)
            continue
        n = _check_count(n, len(rows), f"harmful source '{source}' (data.harmful.sources)")
        picked = sorted(random.Random(f"{seed}:{source}").sample(range(len(rows)), n))
        prompts.extend(rows[i] for i in picked)
    if not prompts:
        raise DatasetError(f"empty prompt set: counts {dict(counts)} select no prompts")
    return prompts


def split(rows: Sequence[T], sizes: tuple[int, ...], seed: int, what: str = "split sizes") -> tuple[list[T], ...]:
    """Seeded shuffle, then consecutive cuts of `sizes` (Study B: (1425, 75, 100)); leftovers are dropped.

    `what` names the sizes in an error, e.g. the config fields they came from.
    """
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise DatasetError(f"{what} must be non-negative integers, got {tuple(sizes)}")
    if sum(sizes) > len(rows):
        raise DatasetError(f"{what} {tuple(sizes)} sum to {sum(sizes)} but there are only {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([rows[i] for i in order[start : start + size]])
        start += size
    return tuple(parts)


# --- checksums ---------------------------------------------------------------------------------

_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_MANIFEST_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, mtime, size) so every run can log checksums cheaply."""
    key = _stat_key(path)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = _hash_file(path)
    return _SHA256_CACHE[key]


def _manifest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 from MANIFEST.json, or {} when the data dir has no manifest."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}
    key = _stat_key(path)
    if key not in _MANIFEST_CACHE:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            _MANIFEST_CACHE[key] = {f["path"]: f["sha256"] for entry in entries for f in entry.get("files", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # UnicodeDecodeError is a ValueError
            reason = " ".join(str(error).split())[:120]
            raise DatasetError(f"{path}: not a valid manifest ({type(error).__name__}: {reason}); "
                               f"{_CORRUPT}") from None
    return _MANIFEST_CACHE[key]


def checksums(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """sha256 of each local file of a dataset, checked against MANIFEST.json when present.

    Hub-only datasets have no local files and give {}.
    """
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    if spec.declared_as and not spec.files:
        return _hub_checksums(spec)
    result = {}
    for rel in spec.files:
        path = _locate(root, rel)
        if path is None or not path.is_file():
            raise DatasetNotFoundError(_missing_message(spec, root, rel, ""))
        digest = _sha256(path)
        expected = _manifest(root).get(rel) if root is not None else None
        if expected is not None and digest != expected:
            raise DatasetError(
                f"dataset '{name}': {path} has sha256 {digest[:12]}... but {MANIFEST_NAME} "
                f"says {expected[:12]}...; the local copy was modified or replaced"
            )
        result[rel] = digest
    return result


def _hub_checksums(spec: DatasetSpec) -> dict[str, str]:
    """A declared hub dataset's identity: its commit (or, for a local folder read through `datasets`, the sha256
    of each of its files)."""
    folder = Path(spec.hub_id).expanduser()
    if folder.is_dir():
        return {str(path.resolve()): _sha256(path) for path in sorted(folder.rglob("*"))
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}
    split = spec.hub_split or "all"
    return {f"hub:{spec.hub_id}:{spec.hub_subset or 'default'}:{split}": hub_revision(spec)}


# --- Study A's benign fine-tuning sets ---------------------------------------------------------


def instruction_sets(
    names: Sequence[str],
    *,
    remove_safety_rows: bool = True,
    equalize: bool = True,
    size: int | None = None,
    val_size: int = 0,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    bad_rows: BadRows = "error",
) -> dict[str, tuple[list[FinetuneRow], list[FinetuneRow]]]:
    """Study A's benign sets, name -> (train, val): Qi et al.'s safety rows dropped, then cut to one N.

    With `equalize`, every set is subsampled (seeded per name, order kept) to the same N: `size`, or the
    smallest set's count after the validation rows are set aside (Study A: Alpaca subsampled to Dolly's 14,624).
    """
    loaded = {}
    for name in names:
        rows = load_finetune(name, data_dir, bad_rows)
        # Only Qi et al.'s two sets have rows to remove; any other set (a user's own) is used as it is.
        loaded[name] = remove_safety(name, rows, data_dir) if remove_safety_rows and name in QI_CLEANED else rows
    available = {name: len(rows) - val_size for name, rows in loaded.items()}
    for name, count in available.items():
        if count < 1:
            raise DatasetError(f"dataset '{name}': {len(loaded[name])} rows leave none for training after {val_size} validation rows")
    target = size if size is not None else (min(available.values()) if equalize else None)
    sets = {}
    for name, rows in loaded.items():
        order = list(range(len(rows)))
        random.Random(f"{seed}:{name}:val").shuffle(order)
        held = set(order[:val_size])
        val = [rows[i] for i in sorted(held)]
        train = [row for i, row in enumerate(rows) if i not in held]
        if target is not None:
            if target > len(train):
                raise DatasetError(f"dataset '{name}': asked for {target} training rows but only {len(train)} are left")
            train = subsample(train, target, seed=int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big"))
        sets[name] = (train, val)
    return sets


def rows_checksum(rows: Sequence[FinetuneRow]) -> str:
    """sha256 of rows' (instruction, input, response) as canonical JSON lines: a dataset version's identity."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.instruction, row.input, row.response], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
