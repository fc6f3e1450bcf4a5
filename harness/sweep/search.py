"""The Optuna sweep (Study B, Table 2): ProMoT's stage-2 learning rate against safety and utility.

`harness sweep CONFIG.yaml` reads an ordinary experiment config plus a `sweep:` section and runs a
two-objective Optuna study: minimise ASR (the harmful mix, one judge), maximise S-BERT (the task's test split,
one format). Each trial fine-tunes the configured seeds with the sampled settings through the same
`ExperimentRunner` as `harness run`, so every trial's fine-tune, stages, checkpoints and evaluations are the
usual MLflow runs, nested under a `trial` run, under the study's one `sweep` run.

Several workers (processes or machines) join one study through one Optuna storage (SQLite beside the MLflow
store by default; PostgreSQL for several machines). Three things make that safe:
- A study-wide lock (a PostgreSQL advisory lock, or a file lock next to a SQLite file) around "count the
  trials, then ask for one", so the trial cap holds across workers, and around the shared set-up (reference
  points, stage 1), so it is done once. Either lock dies with its holder's connection or process.
- Heartbeats: a worker that dies stops beating; after `grace_period` the next worker to look marks its trial
  FAIL (and its MLflow runs FAILED) and queues a retry of the same parameters, which takes its place in the
  count. The cap therefore bounds *effective* trials: every trial not superseded by a retry.
- Resume: rerunning the sweep continues the study. COMPLETE trials are never rerun; an interrupted (Ctrl-C)
  trial or one whose worker died is retried; one that failed by an error of its own stays FAIL and counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from harness.config import (
    ExperimentConfig, Float, Format, Int, Strict, _one_line, config_hash, parse_config, read_yaml, safe_name,
)
from harness.errors import HarnessError
from harness.training.methods import training_method
from tracking.schema import (HARMFUL_MIX, WIKIHOW, ExperimentTag, Kind, Metric, Tag, judge_name, loads_tag,
                             of_current_selection)

OBJECTIVES = (Metric.ASR.value, Metric.SBERT.value)  # a trial's result keys; the study names them per judge/format
DIRECTIONS = ("minimize", "maximize")  # ASR down (safer), S-BERT up (more useful)
FIXED_TRAIN_FIELDS = ("train.methods", "train.quantize_4bit")  # set by the sweep / fixed by the loaded model


class ParamRange(Strict):
    """One searched parameter: a numeric range, or a list of choices."""

    low: Float | None = None
    """Smallest value (with `high`)."""
    high: Float | None = None
    """Largest value (with `low`)."""
    log: bool = False
    """Sample on a log scale (learning rates)."""
    integer: bool = False
    """Sample integers (e.g. train.epochs, train.lora.r)."""
    choices: list[float | int | str | bool] | None = None
    """A categorical parameter instead of a range."""

    @model_validator(mode="after")
    def _range_or_choices(self) -> "ParamRange":
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either non-empty 'choices' or 'low' and 'high'")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"needs low < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SweepConfig(Strict):
    """The `sweep:` section of a sweep YAML; the rest of the file is an ordinary experiment config."""

    method: Literal["promot", "sft"] = "promot"
    """The fine-tuning method whose settings are searched (Study B, Table 2: ProMoT)."""
    format: Format = "prose"
    """The training format (Table 2: prose); must be in data.formats."""
    sampler: Literal["tpe", "nsga2", "gp", "grid"] = "tpe"
    """Optuna sampler: 'tpe', 'nsga2', 'gp', or 'grid' (exactly the values in `grid`)."""
    seed: Int = 0
    """Sampler seed (every worker uses it, so a grid is handed out in the same order everywhere)."""
    n_trials: Int | None = Field(None, ge=1)
    """Trials in the study across all workers; default: the grid's size, else 20."""
    grid: dict[str, list[float | int | str | bool]] | None = None
    """For sampler 'grid': parameter path -> values, e.g. {train.learning_rate: [5.0e-5, 1.0e-4]}."""
    space: dict[str, ParamRange] | None = None
    """For the other samplers: parameter path -> range or choices, e.g. {train.learning_rate: {low: 5.0e-5,
    high: 5.0e-4, log: true}}. Any `train.` field except methods and quantize_4bit may be searched."""
    judge: str | None = None
    """Whose ASR is the objective: a judge name from eval.judges; default the first 'llm' judge, else the first."""
    reference_base: bool = True
    """Evaluate the base model once per sweep: a reference point on the Pareto plot."""
    reference_sft: bool = True
    """Fine-tune SFT once per seed at the config's own train settings: the other reference point."""
    storage: str | None = None
    """Optuna storage URL; default SQLite `optuna.db` beside the MLflow store. Several machines: postgresql://..."""
    study_name: str | None = None
    """Optuna study name; default the experiment's `name`. It names a folder under output_dir, so letters, digits,
    '.', '_' and '-' only, starting with a letter or digit."""
    heartbeat_interval: Int = Field(60, ge=1)
    """Seconds between a running trial's heartbeats."""
    grace_period: Int | None = Field(None, ge=1)
    """Seconds without a heartbeat after which a trial's worker counts as dead; default 2 x heartbeat_interval."""
    max_retry: Int = Field(2, ge=0)
    """How often a trial whose worker died (or was interrupted) is retried with the same parameters."""
    workers: Int = Field(1, ge=1)
    """Worker processes this command starts on this machine (`--workers` overrides)."""
    startup_trials: Int | None = Field(None, ge=0)
    """For 'tpe' and 'gp': how many completed trials before the sampler models the front (Optuna's default 10,
    drawn at random). Continuing a grid study, its points count: 5 after a 5-point grid means no random trials."""

    @field_validator("study_name")
    @classmethod
    def _safe_study_name(cls, name: str | None) -> str | None:
        return None if name is None else safe_name(name, "study name")

    @field_validator("grid", mode="before")
    @classmethod
    def _numbers(cls, grid):
        """YAML 1.1 reads `5e-5` (no dot) as a string; in a grid it means the number."""
        if not isinstance(grid, dict):
            return grid
        def number(value):
            if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
                return float(value)
            return value
        return {name: [number(value) for value in values] if isinstance(values, list) else values
                for name, values in grid.items()}

    @model_validator(mode="after")
    def _search_space(self) -> "SweepConfig":
        if self.sampler == "grid":
            if not self.grid or self.space:
                raise ValueError("sampler 'grid' needs 'grid' (parameter path -> list of values) and no 'space'")
            for name, values in self.grid.items():
                if not values:
                    raise ValueError(f"grid.{name}: give at least one value")
            if self.n_trials is not None and self.n_trials > self.grid_size:
                raise ValueError(f"n_trials {self.n_trials} exceeds the grid's {self.grid_size} points")
        elif not self.space or self.grid:
            raise ValueError(f"sampler '{self.sampler}' needs 'space' (parameter path -> range) and no 'grid'")
        if self.startup_trials is not None and self.sampler not in ("tpe", "gp"):
            raise ValueError(f"startup_trials: only for samplers 'tpe' and 'gp', not '{self.sampler}'")
        for name in self.params:
            if not name.startswith("train.") or name in FIXED_TRAIN_FIELDS:
                raise ValueError(f"cannot search {name!r}: only train.* fields other than {', '.join(FIXED_TRAIN_FIELDS)}")
        return self

    @property
    def params(self) -> list[str]:
        return list(self.grid or self.space or {})

    @property
    def grid_size(self) -> int:
        return math.prod(len(values) for values in (self.grid or {}).values())

    @property
    def trials(self) -> int:
        return self.n_trials or (self.grid_size if self.sampler == "grid" else 20)


# -- loading -------------------------------------------------------------------------------------------------


def parse_sweep(data: object, source: str = "sweep config") -> tuple[ExperimentConfig, SweepConfig]:
    """An experiment config with a `sweep:` section -> (experiment, sweep); every problem one line naming its field."""
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict):
        raise HarnessError(f"{source}: sweep: required section missing (a mapping of sweep settings)")
    data = dict(data)
    raw_sweep = data.pop("sweep")
    try:
        sweep = SweepConfig.model_validate(raw_sweep)
    except ValidationError as error:
        raise HarnessError(_one_line(error, source).replace(f"{source}: ", f"{source}: sweep.", 1).replace("; ", "; sweep.")) from None
    if "methods" in (data.get("train") or {}):
        raise HarnessError(f"{source}: train.methods: set by the sweep (sweep.method, sweep.reference_sft); remove it")
    methods = [sweep.method] + (["sft"] if sweep.reference_sft and sweep.method != "sft" else [])
    data["train"] = {**(data.get("train") or {}), "methods": methods}
    cfg = parse_config(data, source)
    if sweep.format not in cfg.data.formats:
        raise HarnessError(f"{source}: sweep.format: {sweep.format!r} is not in data.formats {cfg.data.formats}")
    judges = [judge.name for judge in cfg.eval.judges]
    if sweep.judge is not None and sweep.judge not in judges:
        raise HarnessError(f"{source}: sweep.judge: {sweep.judge!r} is not in eval.judges ({', '.join(judges)})")
    if not cfg.eval.task:
        raise HarnessError(f"{source}: eval.task: must be true, S-BERT on the task is an objective")
    for name in sweep.params:  # every parameter must land on a real field and validate at its extreme values
        values = sweep.grid[name] if sweep.grid else (sweep.space[name].choices or [sweep.space[name].low, sweep.space[name].high])
        for value in values:
            apply_params(cfg, {name: int(value) if sweep.space and sweep.space[name].integer else value},
                         f"{source}: sweep.{'grid' if sweep.grid else 'space'}.{name}")
    return cfg, sweep


def load_sweep(path: str | Path) -> tuple[ExperimentConfig, SweepConfig]:
    return parse_sweep(read_yaml(path), str(path))


def apply_params(cfg: ExperimentConfig, params: dict[str, Any], source: str = "sweep trial") -> ExperimentConfig:
    """The experiment config with a trial's parameters set (dotted paths), validated like any config."""
    data = cfg.resolved()
    for name, value in params.items():
        *parents, leaf = name.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise HarnessError(f"{source}: {name!r} is not a config field")
            node = node[part]
        if leaf not in node:
            raise HarnessError(f"{source}: {name!r} is not a config field")
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise HarnessError(_one_line(error, source)) from None


def objective_judge(cfg: ExperimentConfig, sweep: SweepConfig) -> str:
    if sweep.judge:
        return sweep.judge
    names = [judge.name for judge in cfg.eval.judges]
    return "llm" if "llm" in names else names[0]


# -- storage and the study-wide lock -------------------------------------------------------------------------


def storage_url(sweep: SweepConfig, tracking_uri: str) -> str:
    """The configured URL, else SQLite beside a SQLite MLflow store (else ./mlruns/optuna.db)."""
    url = sweep.storage
    if url is None:
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent if tracking_uri.startswith("sqlite:///") else Path("mlruns")
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(folder / 'optuna.db').resolve()}"
    if url.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; we ship psycopg (3)
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def redact(url: str) -> str:
    """A storage or tracking URL fit for a tag or a log line: the password replaced by ***."""
    return re.sub(r"(//[^:/@]+:)[^@/]*@", r"\1***@", url)


def _lock_key(study: str, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{study}:{purpose}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def study_lock(url: str, study: str, purpose: str) -> Iterator["Lock"]:
    """Held by one worker of the study at a time, released when the holder's process or connection dies."""
    lock = Lock(url, study, purpose)
    try:
        yield lock
    finally:
        lock.release()


class Lock:
    """A PostgreSQL advisory lock, or an flock on a file beside a SQLite storage; released once, idempotently."""

    def __init__(self, url: str, study: str, purpose: str):
        self._release = None
        if url.startswith("sqlite:///"):
            handle = open(f"{url.removeprefix('sqlite:///')}.{hashlib.sha256(study.encode()).hexdigest()[:8]}.{purpose}.lock", "w")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._release = handle.close  # closing the file drops the flock
        elif url.startswith("postgresql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            engine = create_engine(url, poolclass=NullPool)
            connection = engine.connect()
            key = _lock_key(study, purpose)
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})

            def release():
                try:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                finally:
                    connection.close()
                    engine.dispose()

            self._release = release
        else:
            warnings.warn(f"no study-wide lock for {redact(url)}: the trial cap may be exceeded by concurrent workers")

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


# -- the worker ----------------------------------------------------------------------------------------------


def make_sampler(sweep: SweepConfig, asked: int = 0):
    """The Optuna sampler for the next trial. A model-based one is seeded with `seed + asked` (trials in the study
    so far): the same history gives the same proposal, and two workers that ask one after the other (each made
    its sampler from the same seed) never draw the same point. The grid keeps one seed: one order everywhere."""
    import optuna

    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(sweep.grid, seed=sweep.seed)
    seed = sweep.seed + asked
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    startup = {} if sweep.startup_trials is None else {"n_startup_trials": sweep.startup_trials}
    if sweep.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    return optuna.samplers.TPESampler(seed=seed, **startup)  # constant_liar (Optuna 5's default): running trials count


def effective_trials(trials: list) -> list:
    """Every trial not superseded by a retry (a retry's `retry_history` names the trials it replaces)."""
    superseded = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    return [trial for trial in trials if trial.number not in superseded]


class Sweep:
    """One worker of a sweep: loads the model once, then takes trials until the study has all of its own."""

    def __init__(self, cfg: ExperimentConfig, sweep: SweepConfig):
        self.cfg, self.sweep = cfg, sweep
        self.study_name = sweep.study_name or cfg.name
        self.judge = objective_judge(cfg, sweep)
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}"
        self._ask_lock: Lock | None = None

    # -- set-up -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        import optuna

        from harness.study.runner import ExperimentRunner

        self.runner = ExperimentRunner(self.cfg)
        self.runner.prepare()  # data, model, judges, S-BERT: every input error before any run or trial
        self.tracker = self.runner.tracker
        self.open_study(storage_url(self.sweep, self.tracker.tracking_uri))
        # Everything but the searched fields identifies the study: another model or data under the same name is an error.
        # runtime is how it computes, not what (recorded on runs); eval.headline only picks the summary's ASR column.
        resolved = self.cfg.resolved()
        resolved["eval"] = {key: value for key, value in resolved["eval"].items() if key != "headline"}
        identity = config_hash({"experiment": {**resolved, "tracking": None, "output_dir": None, "runtime": None},
                                "method": self.sweep.method, "format": self.sweep.format, "judge": self.judge,
                                "params": sorted(self.sweep.params)})
        recorded = self.study.user_attrs.get("harness_identity")
        if recorded is None:
            self.study.set_user_attr("harness_identity", identity)
        elif recorded != identity:
            raise HarnessError(f"Optuna study {self.study_name!r} in {redact(self.url)} was started with another "
                               f"experiment config or search space; set sweep.study_name to start a new one")
        self.open_sweep_run()

    def open_study(self, url: str) -> None:
        """The shared Optuna study (created by the first worker), on a storage with heartbeats."""
        import optuna

        self.url = url
        engine_kwargs = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {"pool_pre_ping": True}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Two workers creating the tables of a new storage at once collide: one at a time.
        with warnings.catch_warnings(), study_lock(self.url, self.study_name, "create"):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.sweep.max_retry)
            self.storage = optuna.storages.RDBStorage(
                self.url, engine_kwargs=engine_kwargs, heartbeat_interval=self.sweep.heartbeat_interval,
                grace_period=self.sweep.grace_period, heartbeat_stale_trial_callback=self.on_stale_trial,
            )
            self.study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                             sampler=make_sampler(self.sweep), directions=list(DIRECTIONS),
                                             load_if_exists=True)
        if tuple(direction.name.lower() for direction in self.study.directions) != DIRECTIONS:
            raise HarnessError(f"Optuna study {self.study_name!r} in {redact(self.url)} is not an ASR/S-BERT study; "
                               f"set sweep.study_name")
        if self.study.metric_names != self.metric_names():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(self.metric_names())  # optuna-dashboard's axis and column names

    def metric_names(self) -> list[str]:
        """The objectives as optuna-dashboard shows them: whose ASR and which format's S-BERT (`asr_llm`,
        `sbert_prose`), the same for every worker since the judge and format are part of the study's identity."""
        return [f"{Metric.ASR}_{self.judge}", f"{Metric.SBERT}_{self.sweep.format}"]

    def open_sweep_run(self) -> None:
        """The study's one `sweep` run, shared by every worker; created by the first, FINISHED by the last."""
        import optuna

        from tracking.provenance import provenance
        from tracking.runs import RunHandle, _owner, flatten

        unit = {"optuna_study": self.study_name}
        digest = config_hash(unit)
        with study_lock(self.url, self.study_name, "sweep-run"):
            runs = self.tracker.unit_runs(Kind.SWEEP, digest)
            if runs:
                run_id = runs[0].info.run_id
                self.tracker.client.update_run(run_id, status="RUNNING")
            else:
                tags = {Tag.KIND: Kind.SWEEP, Tag.STUDY: self.cfg.name, Tag.CONFIG_HASH: digest,
                        Tag.MODEL: self.cfg.model, Tag.DATASET: self.cfg.data.procedures,
                        Tag.FORMAT: self.sweep.format, Tag.METHOD: self.sweep.method,
                        Tag.GIT_COMMIT: provenance()["git"]["commit"], Tag.OWNER: _owner()}
                run_id = self.tracker.client.create_run(
                    self.tracker.experiment_id, run_name=f"sweep-{self.study_name}",
                    tags={name.key: str(value) for name, value in tags.items()}).info.run_id
            self.sweep_run = RunHandle(self.tracker.client, run_id)
            resolved = {"sweep": {**self.sweep.model_dump(mode="json"), "storage": redact(self.url),
                                  "study_name": self.study_name, "judge": self.judge, "n_trials": self.sweep.trials},
                        "experiment": self.cfg.resolved()}
            if not runs:
                self.sweep_run.log_params(flatten(resolved))
                self.sweep_run.log_dict(resolved, "sweep_config.json")
                self.sweep_run.log_dict(provenance(), "provenance.json")
            self.sweep_run.set_tags({Tag.SAMPLER.key: self.sweep.sampler, Tag.SAMPLER_SEED.key: self.sweep.seed,
                                     Tag.OPTUNA_STUDY.key: self.study_name, Tag.OPTUNA_STORAGE.key: redact(self.url),
                                     Tag.OPTUNA_VERSION.key: optuna.__version__, Tag.JUDGE.key: self.judge,
                                     Tag.N_TRIALS.key: self.sweep.trials})
        self.study.set_user_attr("mlflow_sweep_run_id", run_id)
        # Links back to MLflow, shown by optuna-dashboard: the study's experiment (id and name) and store.
        self.study.set_user_attr("mlflow_experiment_id", self.tracker.experiment_id)
        self.study.set_user_attr("mlflow_experiment_name", self.tracker.study)
        self.study.set_user_attr("mlflow_tracking_uri", redact(self.tracker.tracking_uri))

    def shared_units(self) -> None:
        """Reference points and ProMoT's stage 1, done once for the whole study (the first worker; the rest wait)."""
        with study_lock(self.url, self.study_name, "shared"):
            refs: dict[str, dict] = {}
            if self.sweep.reference_base:
                refs["base"] = self.base_reference()
            if self.sweep.reference_sft:
                hashes = []
                for seed in self.cfg.seeds:
                    self.runner.finetune("sft", self.sweep.format, seed, parent=self.sweep_run)
                    hashes.append(self.runner.finetune_unit(self.sweep.format, "sft", seed))
                refs["sft"] = self.objectives(hashes)
            if self.sweep.method == "promot":  # every trial shares its seed's stage-1 prompt: trained once, here
                for seed in self.cfg.seeds:
                    tags = {Tag.MODEL: self.cfg.model, Tag.DATASET: self.cfg.data.procedures, Tag.FORMAT: self.sweep.format,
                            Tag.METHOD: "promot", Tag.SEED: seed}
                    training_method("promot").stage1_prompt(self.runner, self.sweep_run, tags)
        self.references = refs
        for name, values in refs.items():
            self.sweep_run.log_metrics({f"reference_{name}_{key}": values[key]
                                        for key in ("asr", "sbert", "asr_std", "sbert_std", "asr_n")})

    def base_reference(self) -> dict:
        """The base model's evaluation unit (as `harness run` makes it), reused if FINISHED anywhere in the study
        and evaluated on whatever it lacks."""
        run_id = self.runner.evaluate_base(parent=self.sweep_run)
        return self.checkpoint_objectives([self.tracker.client.get_run(run_id)])

    # -- objectives ---------------------------------------------------------------------------------------
    def checkpoint_objectives(self, checkpoints: list) -> dict:
        """Mean ASR (the objective judge) and S-BERT (the sweep's format) over the checkpoints' evaluations:
        every seed, decoding setting and repeat; the spread is reported beside the mean."""
        from harness.study.runner import children

        current = loads_tag(self.tracker.experiment_tag(ExperimentTag.CURRENT_SELECTION))
        decodings = {(str(d.temperature), None if d.min_p is None else str(d.min_p)) for d in self.cfg.eval.decoding}
        asr, sbert = [], []
        for checkpoint in checkpoints:
            for run in children(self.tracker, checkpoint):
                tags = run.data.tags
                if run.info.status != "FINISHED" or tags.get(Tag.KIND.key) != Kind.EVALUATION \
                        or tags.get(Tag.SOFT_PROMPT.key) == "True":
                    continue
                # only what this config evaluates: its prompt selection and decodings, not a grown study's others
                if not of_current_selection(tags, current) or \
                        (tags.get(Tag.TEMPERATURE.key), tags.get(Tag.MIN_P.key)) not in decodings:
                    continue
                benchmark = tags.get(Tag.BENCHMARK.key)
                if benchmark == HARMFUL_MIX and judge_name(tags.get(Tag.JUDGE.key)) == self.judge:
                    asr.append(run.data.metrics[Metric.ASR])
                elif benchmark == WIKIHOW and tags.get(Tag.FORMAT.key) == self.sweep.format:
                    sbert.append(run.data.metrics[Metric.SBERT])
        if not asr or not sbert:
            raise HarnessError(f"no FINISHED {'ASR' if not asr else 'S-BERT'} evaluation under checkpoint(s) "
                               f"{', '.join(run.info.run_id for run in checkpoints)}")
        result: dict[str, Any] = {}
        for name, values in zip(OBJECTIVES, (asr, sbert)):
            result[name] = statistics.fmean(values)
            result[f"{name}_std"] = statistics.pstdev(values)
            result[f"{name}_min"], result[f"{name}_max"] = min(values), max(values)
            result[f"{name}_n"] = len(values)
        return result

    def objectives(self, units: list[dict]) -> dict:
        """Objectives over fine-tune units (one per seed), each at its last epoch; FINISHED runs found by hash."""
        from harness.study.runner import descendants

        checkpoints, finetunes = [], []
        for unit in units:
            finetune = self.tracker.finished(Kind.FINETUNE, config_hash(unit))
            if finetune is None:
                raise HarnessError(f"fine-tune {config_hash(unit)} did not finish")
            found = descendants(self.tracker, finetune, Kind.CHECKPOINT)
            checkpoints.append(max(found, key=lambda run: int(run.data.tags.get(Tag.EPOCH.key, 0))))
            finetunes.append(finetune.info.run_id)
        return {**self.checkpoint_objectives(checkpoints), "finetune_runs": ",".join(finetunes)}

    # -- trials -------------------------------------------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        params = {}
        for name in self.sweep.params:
            if self.sweep.grid:
                values = self.sweep.grid[name]
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                params[name] = (trial.suggest_float(name, min(values), max(values), log=min(values) > 0)
                                if numeric and len(set(values)) > 1 else trial.suggest_categorical(name, values))
            else:
                spec = self.sweep.space[name]
                if spec.choices is not None:
                    params[name] = trial.suggest_categorical(name, spec.choices)
                elif spec.integer:
                    params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
                else:
                    params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        return params

    def objective(self, trial) -> tuple[float, float]:
        """One trial: fine-tune every seed with the sampled settings under a `trial` run; mean ASR and S-BERT."""
        if self._ask_lock is not None:  # the trial now exists: other workers may count and ask
            self._ask_lock.release()
        trial.set_user_attr("worker", self.worker_id)
        trial.set_user_attr("interrupted", False)  # a retry inherits its original's user attributes
        try:
            return self.run_trial(trial, self.suggest(trial))
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # a rerun retries it (an error of its own would not be)
            raise
        except Exception as error:
            print(f"trial {trial.number} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                  file=sys.stderr, flush=True)
            raise

    def run_trial(self, trial, params: dict[str, Any]) -> tuple[float, float]:
        cfg = apply_params(self.cfg, params)
        retry_of = self.storage.get_trial_system_attrs(trial._trial_id).get("retry_history") or None
        shown = ", ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items())
        print(f"trial {trial.number} ({shown}){' retrying trial ' + str(retry_of[-1]) if retry_of else ''}", flush=True)
        tags = {Tag.MODEL: cfg.model, Tag.DATASET: cfg.data.procedures, Tag.FORMAT: self.sweep.format,
                Tag.METHOD: self.sweep.method, Tag.TRIAL_NUMBER: trial.number, Tag.OPTUNA_STUDY: self.study_name}
        # Sampled values are logged as `optuna.<path>` params below; the unit's own key must not collide with them.
        unit = {**cfg.resolved(), "trial": {"study": self.study_name, "number": trial.number, "params": params}}
        with self.tracker.run(Kind.TRIAL, f"trial-{trial.number}", tags, parent=self.sweep_run, config=unit,
                              config_hash=config_hash({"optuna_study": self.study_name, "trial": trial.number})) as run:
            trial.set_user_attr("mlflow_run_id", run.run_id)  # the dashboard's link back: the run and its store
            trial.set_user_attr("mlflow_tracking_uri", redact(self.tracker.tracking_uri))
            run.set_tags({Tag.OPTUNA_TRIAL_ID.key: trial._trial_id, Tag.WORKER.key: self.worker_id,
                          Tag.RETRY_OF.key: retry_of[-1] if retry_of else None})
            run.log_params({f"optuna.{name}": value for name, value in params.items()})
            # The trial trains with its sampled `train.*` settings; evaluation reads none of them (it keeps the
            # study's own setup), so every trial is scored on the same prompts, decodings and judges.
            self.runner.cfg = cfg
            try:
                for seed in cfg.seeds:
                    self.runner.finetune(self.sweep.method, self.sweep.format, seed, parent=run)
                result = self.objectives([self.runner.finetune_unit(self.sweep.format, self.sweep.method, seed)
                                          for seed in cfg.seeds])
            finally:
                self.runner.cfg = self.cfg
                self.runner.summary = []
            run.log_metrics({key: value for key, value in result.items() if isinstance(value, (int, float))})
            run.set_tags({Tag.TRIAL_STATE.key: "COMPLETE", Tag.FINETUNE_RUNS.key: result["finetune_runs"]})
        for key, value in result.items():
            trial.set_user_attr(key, value)
        print(f"trial {trial.number}: asr {result['asr']:.3f} (sd {result['asr_std']:.3f}), "
              f"sbert {result['sbert']:.3f} (sd {result['sbert_std']:.3f})", flush=True)
        return result["asr"], result["sbert"]

    def on_stale_trial(self, study, trial) -> None:
        """Called by whichever worker notices a dead one: its MLflow runs say so, and the trial is queued again."""
        self.worker_died(study, trial, f"no heartbeat for {self.sweep.grace_period or 2 * self.sweep.heartbeat_interval}s")

    def worker_died(self, study, trial, how: str) -> None:
        worker = trial.user_attrs.get("worker", "?")
        self.fail_mlflow_runs(trial.user_attrs.get("mlflow_run_id"),
                              f"worker {worker} stopped ({how}); Optuna trial {trial.number} marked FAIL")
        print(f"trial {trial.number}: worker {worker} stopped ({how}); marked FAIL, {self.requeue(study, trial)}",
              flush=True)

    def requeue(self, study, trial) -> str:
        """Queue the trial's parameters again (at most max_retry times per original trial)."""
        if len(trial.system_attrs.get("retry_history", [])) >= self.sweep.max_retry:
            return f"not retried (sweep.max_retry {self.sweep.max_retry} reached)"
        self.retry(study, trial)
        return "queued again"

    def fail_mlflow_runs(self, run_id: str | None, reason: str) -> None:
        """Mark a dead trial's run and its unfinished descendants FAILED (they were RUNNING in a dead process)."""
        from harness.study.runner import children

        frontier = [run_id] if run_id else []
        while frontier:
            run = self.tracker.client.get_run(frontier.pop())
            frontier += [child.info.run_id for child in children(self.tracker, run)]
            if run.info.status == "RUNNING":
                self.tracker.client.set_tag(run.info.run_id, Tag.ERROR.key, reason)
                self.tracker.client.set_tag(run.info.run_id, Tag.TRIAL_STATE.key, "FAIL")
                self.tracker.client.set_terminated(run.info.run_id, "FAILED")

    def recover(self) -> None:
        """Before counting: fail the trials of dead workers (no heartbeat for grace_period) and queue interrupted
        trials again, so the count below sees each as its retry."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # calls on_stale_trial for each
        for trial in effective_trials(self.study.get_trials(deepcopy=False)):
            if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") \
                    and len(trial.system_attrs.get("retry_history", [])) < self.sweep.max_retry:
                print(f"trial {trial.number} was interrupted: {self.requeue(self.study, trial)}", flush=True)

    def work(self) -> None:
        """Take trials until the study has `n_trials` effective trials, all finished (waiting out other workers'
        running trials, which may yet die and come back as retries)."""
        from optuna.trial import TrialState

        while True:
            lock = Lock(self.url, self.study_name, "ask")
            try:
                self.recover()
                trials = effective_trials(self.study.get_trials(deepcopy=False))
                pending = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if len(trials) >= self.sweep.trials and not pending:
                    return
                if waiting or len(trials) < self.sweep.trials:
                    self._ask_lock = lock
                    if self.sweep.sampler != "grid":
                        self.study.sampler = make_sampler(self.sweep, asked=len(self.study.get_trials(deepcopy=False)))
                    self.study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
                    self.report_progress()
                    continue
            finally:
                lock.release()
                self._ask_lock = None
            time.sleep(min(self.sweep.heartbeat_interval, 10))  # others' trials still run: they may die and return

    def report_progress(self) -> None:
        """The whole sweep in one line after each trial (`harness status`'s count), from the prepared runner's data;
        a worker that never prepared one (no trial of its own ran) has nothing new to say."""
        runner = getattr(self, "runner", None)
        if runner is None:
            return
        from harness.study.status import report_progress

        report_progress(self.cfg, self.sweep, data=getattr(runner, "data", None),
                        source=getattr(runner, "model_source", None))

    # -- the result ---------------------------------------------------------------------------------------
    def finish(self, out: Path) -> dict:
        """Pareto front -> pareto_front.csv, trials.csv and pareto_front.png on the sweep run; FINISHED when complete."""
        from optuna.trial import TrialState

        from harness.analysis.figures_sweep import draw_pareto, write_rows

        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        front = {t.number for t in self.study.best_trials} if complete else set()
        rows = [trial_row(t, self.sweep.params, t.number in front) for t in complete]
        out.mkdir(parents=True, exist_ok=True)
        write_rows(out / "trials.csv", rows)
        write_rows(out / "pareto_front.csv", [row for row in rows if row["pareto"]])
        refs = getattr(self, "references", {})
        draw_pareto(rows, {name: (values["asr"], values["sbert"]) for name, values in refs.items()},
                    out / "pareto_front.png", title=f"{self.study_name}: {self.sweep.method} {self.sweep.format}, "
                    f"judge {self.judge}", param=self.sweep.params[0] if len(self.sweep.params) == 1 else None)
        for name in ("trials.csv", "pareto_front.csv", "pareto_front.png"):
            self.tracker.client.log_artifact(self.sweep_run.run_id, str(out / name), "pareto")
        effective = effective_trials(trials)
        done = len(effective) >= self.sweep.trials and all(t.state.is_finished() for t in effective)
        counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
        self.sweep_run.log_metrics({f"trials_{name.lower()}": count for name, count in counts.items()})
        if done:
            self.tracker.client.set_terminated(self.sweep_run.run_id, "FINISHED")
        return {"rows": rows, "references": refs, "done": done, "counts": counts, "out": out}


def trial_row(trial, params: list[str], pareto: bool) -> dict:
    attrs = trial.user_attrs
    return {"trial": trial.number, **{name: trial.params.get(name) for name in params},
            "asr": trial.values[0], "sbert": trial.values[1], "asr_std": attrs.get("asr_std"),
            "sbert_std": attrs.get("sbert_std"), "n": attrs.get("asr_n"), "pareto": pareto,
            "mlflow_run_id": attrs.get("mlflow_run_id")}


def run_sweep(cfg: ExperimentConfig, sweep: SweepConfig) -> dict:
    """One worker, start to end: set-up, shared units, trials, then the Pareto artifacts."""
    worker = Sweep(cfg, sweep)
    worker.prepare()
    print(f"sweep {worker.study_name}: {sweep.trials} trial(s), sampler {sweep.sampler}, storage {redact(worker.url)}",
          flush=True)
    worker.shared_units()
    worker.work()
    result = worker.finish(Path(cfg.output_dir) / cfg.name / f"sweep-{worker.study_name}")
    result.update(storage=worker.url, tracking_uri=worker.tracker.tracking_uri, study_name=worker.study_name)
    return result


def spawn_workers(cfg: ExperimentConfig, config: Path, workers: int, storage: str | None) -> int:
    """`--workers N`: N processes of this command, each one Optuna worker on the same storage, the CPU split
    between them. Returns the first non-zero exit code (0 if all succeeded)."""
    from tracking import Tracker

    Tracker(cfg.name, cfg.tracking.uri)  # the MLflow store and experiment exist before N processes race to make them
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "harness.cli.main", "sweep", str(config), "--workers", "1"]
    command += ["--storage", storage] if storage else []
    processes = [subprocess.Popen(command, env=env) for _ in range(workers)]
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.wait()
        raise
    return next((code for code in codes if code), 0)
