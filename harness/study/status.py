"""`harness status CONFIG`: what a study has done, is doing, failed at and has left, without loading a model.

A long study on a shared machine is killed, pre-empted or simply slow; before rerunning it (or while another
process runs it) one wants to know what is finished, what is running where, what failed and why, and how much
is left. The store already says what exists; the config says what should. So this module plans the config's
units the way `harness run` would, matches them to the store's runs and counts:

- fine-tunes, ProMoT stages and checkpoints: exact identities, from the runner's own unit functions
  (`ExperimentRunner.finetune_unit` / `base_unit`, `ProMoT.stage1_unit`) on the prepared data and the model's
  digest. The digest of a packaged or .gguf model is read from its files, never converted or loaded.
- generations: exact identities, from the evaluation planner (`StateEvaluator.plan`) over the same prompts.
- evaluations: the planner's scorings, matched by (generation, judge name or task format). A judge's *version*
  (template, model, threshold) is not checked: knowing it means building the judge, which loads its model. So
  an evaluation by an edited judge still counts as done here, though `harness run` would redo it.
- Study A's self-generated sets exist only once the base model has written them: their fine-tunes are found
  by tags (method, dataset, seed) and their units read back from the run's `config.json`; before that, they
  and everything under them count as left.
- a sweep YAML: the shared units (base and SFT reference points, ProMoT's stage 1) as above, plus one unit per
  Optuna trial, read from the Optuna storage (a trial's own fine-tune depends on sampled values, so it is
  counted as part of its trial).

A unit is done when a FINISHED run has its identity; else the newest run says running (RUNNING: its owner tag
gives host and pid, and on this host whether that process is alive) or failed (FAILED/KILLED, with the first
line of `harness.error`); with no run it is left. Time left is rough: each unfinished unit costs the median
*own* time (duration less its children's) of finished runs like it (same kind and method, stage, benchmark or
judge), so parents and children are not counted twice. `progress_line` and `show_progress` give the one-line
form a running study can print after each unit.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from harness.config import ExperimentConfig, config_hash
from tracking.schema import Kind, Tag, judge_name

KINDS = (Kind.TRIAL, Kind.FINETUNE, Kind.STAGE, Kind.CHECKPOINT, Kind.GENERATION, Kind.EVALUATION)
OWN_REFUSAL_JUDGES = ("fulfilment", "wildguard", "trained")
"""Judges that answer "refused" themselves (`evals.scoring.refusal_judge`); every other harm judge's over-refusal
is the keyword judge's."""


@dataclass
class Unit:
    """One unit the config makes, and what the store says about it."""

    kind: str
    name: str
    timing: str
    """Which finished runs time it: `kind` plus method, stage, benchmark or judge (see `timing_key`)."""
    hashes: tuple[str, ...] = ()
    """Its identities (`harness.config_hash`); none: unknown."""
    generation_hashes: tuple[str, ...] = ()
    """Evaluations: the generation they score (with `label`, the judge or format, they are matched by it)."""
    label: str | None = None
    state: str = "left"
    """done, running, failed or left."""
    run: object | None = None
    detail: str = ""
    """running: where (host:pid, alive or not); failed: the error's first line."""
    alive: bool | None = None
    """running: whether its process is alive (None: on another host, so unknown)."""


@dataclass
class Counts:
    """The summary of a status: what `progress_line` prints."""

    total: int
    done: int
    running: int
    failed: int
    seconds_left: float
    untimed: int
    """Unfinished units with nothing finished like them to time them by (not in `seconds_left`)."""
    stale: int = 0
    """Running units whose process on this host is gone (killed): a rerun takes them over."""


@dataclass
class StudyStatus:
    study: str
    units: list[Unit]
    typical: dict[str, float] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    """Runs in the study that this config does not make (older selections, other settings), by state."""

    def counts(self, now: float | None = None) -> Counts:
        now = time.time() if now is None else now
        seconds, untimed, stale = 0.0, 0, 0
        for unit in self.units:
            if unit.state == "done":
                continue
            stale += unit.state == "running" and unit.alive is False
            typical = self.typical.get(unit.timing, self.typical.get(unit.kind))
            if typical is None:
                untimed += 1
            elif unit.state == "running" and unit.alive is not False and unit.run is not None:
                seconds += max(0.0, typical - (now - unit.run.info.start_time / 1000))  # part done already
            else:
                seconds += typical
        states = [unit.state for unit in self.units]
        return Counts(len(states), states.count("done"), states.count("running"), states.count("failed"), seconds,
                      untimed, stale)


# -- what the config makes ---------------------------------------------------------------------------------------


def model_source(spec: str):
    """The model's source with its digest, read from its files: a packaged or .gguf model is not converted (that
    takes a minute and writes the cache), a hub id or directory is only hashed."""
    from harness import models

    path = Path(spec).expanduser()
    if spec in models.ALIASES:
        return models.ModelSource(spec, "alias", "", models._alias_parts(spec)[2])
    if path.is_file() and path.suffix == ".gguf":
        return models.ModelSource(spec, "gguf", str(path), models._gguf_digest(path))
    return models.resolve_model(spec)


class _NoStore:
    """The planner's tracker while planning: its stored runs are matched here, by label, not by judge version."""

    def search(self, filter_string: str = "") -> list:
        return []


class Planner:
    """The units a config makes: the runner's and the evaluation planner's identities, used read-only."""

    def __init__(self, cfg: ExperimentConfig, data=None, source=None, runs: list | None = None, client=None):
        from harness.evals.benchmarks import EvaluationSetup
        from harness.evals.state import StateEvaluator
        from harness.study.runner import ExperimentRunner, prepare_data

        self.cfg, self.runs, self.client = cfg, runs or [], client
        self.runner = ExperimentRunner(cfg)  # never prepared: only its unit functions are used
        self.runner.model_source = source if source is not None else model_source(cfg.model)
        self.runner.data = data if data is not None else prepare_data(cfg)
        judges = [SimpleNamespace(name=judge.name, version="?") for judge in cfg.eval.judges]
        refusal = dict.fromkeys(j.name if j.name in OWN_REFUSAL_JUDGES else "keyword" for j in judges)
        toxicity = SimpleNamespace(name="?", version="?") if cfg.eval.toxicity is not None else None
        setup = EvaluationSetup(cfg, self.runner.data, judges,
                                [SimpleNamespace(name=name, version="?") for name in refusal], toxicity=toxicity)
        self.evaluator = StateEvaluator(_NoStore(), setup, tokenizer=None)
        self.units: list[Unit] = []

    def study(self) -> list[Unit]:
        """`harness run`: the base model, then every method × training set × seed with its checkpoints."""
        cfg = self.cfg
        if cfg.eval.evaluate_base:
            self.base()
        for method in cfg.train.methods:
            for key in self.training_sets():
                for seed in cfg.seeds:
                    self.finetune(method, key, seed)
        return self.units

    def sweep(self, sweep, trials: list[Unit]) -> list[Unit]:
        """`harness sweep`: the reference points and stage 1 made once, then the trials."""
        if sweep.reference_base:
            self.base()
        for seed in self.cfg.seeds:
            if sweep.reference_sft:
                self.finetune("sft", sweep.format, seed)
            if sweep.method == "promot":
                self.stage1(sweep.format, seed)
        self.units += trials
        return self.units

    def training_sets(self) -> list[str]:
        keys = list(self.runner.data.set_tags)
        selfgen = self.cfg.data.finetune.selfgen if self.cfg.data.task == "instructions" else None
        if selfgen is not None and selfgen.enabled:
            keys += [f"{name}-selfgen" for name in selfgen.datasets or list(self.runner.data.set_tags)]
        return keys

    def base(self) -> None:
        unit = self.runner.base_unit()
        self.add(Kind.CHECKPOINT, "base", config_hash(unit))
        self.states("base", config_hash(unit), {}, self.cfg.data.formats)

    def stage1(self, key: str, seed: int) -> None:
        from harness.training.methods import training_method

        unit = training_method("promot").stage1_unit(self.runner, key, seed)
        self.add(Kind.STAGE, f"promot-{key}-seed{seed}-stage1", config_hash(unit), "stage 1")

    def finetune(self, method: str, key: str, seed: int) -> None:
        name = f"{method}-{key}-seed{seed}"
        unit = self.selfgen_unit(method, key, seed) if key.endswith("-selfgen") else self.runner.finetune_unit(key, method, seed)
        self.add(Kind.FINETUNE, name, unit and config_hash(unit), f"finetune {method}")
        if method == "promot":
            self.stage1(key, seed)
            self.add(Kind.STAGE, f"{name}-stage2", unit and config_hash({**unit, "stage": 2}), "stage 2")
        with_prompt = method == "promot" and self.cfg.train.promot.evaluate_with_prompt
        for epoch in range(1, self.cfg.train.epochs + 1):
            ckpt = unit and {**unit, "epoch": epoch}
            self.add(Kind.CHECKPOINT, f"{name}-epoch{epoch}", ckpt and config_hash(ckpt))
            self.states(f"{name}-epoch{epoch}", ckpt and config_hash(ckpt), {}, [key])
            if with_prompt:
                self.states(f"{name}-epoch{epoch}+prompt", ckpt and config_hash({**ckpt, "soft_prompt": True}),
                            {Tag.SOFT_PROMPT: True}, [key])

    def selfgen_unit(self, method: str, key: str, seed: int) -> dict | None:
        """A self-generated set's fine-tune unit, read back from its run (none before the set exists)."""
        found = [run for run in self.runs if run.data.tags.get(Tag.KIND.key) == Kind.FINETUNE
                 and (run.data.tags.get(Tag.METHOD.key), run.data.tags.get(Tag.DATASET.key),
                      run.data.tags.get(Tag.SEED.key)) == (method, key, str(seed))]
        if not found or self.client is None:
            return None
        run = max(found, key=lambda run: (run.info.status == "FINISHED", run.info.start_time))
        with tempfile.TemporaryDirectory() as folder:
            return json.loads(Path(self.client.download_artifacts(run.info.run_id, "config.json", folder)).read_text())

    def states(self, name: str, state_id: str | None, tags: dict, score_formats: list[str]) -> None:
        """A model state's generations and evaluations, as `StateEvaluator.plan` lays them out."""
        for generation in self.evaluator.plan("", {}, tags, state_id=state_id or "unknown",
                                              score_formats=score_formats):
            hashes = (generation.config_hash,) if state_id else ()
            benchmark = generation.benchmark.name
            self.add(Kind.GENERATION, f"{name} {benchmark} {generation.suffix}", hashes, f"generation {benchmark}")
            for planned in generation.evaluations:
                label = planned.scoring.label
                self.units.append(Unit(Kind.EVALUATION, f"{name} {benchmark} {generation.suffix} {label}",
                                       f"evaluation {benchmark} {label}", generation_hashes=hashes, label=label))

    def add(self, kind: str, name: str, digest: str | tuple | None, timing: str | None = None) -> None:
        hashes = digest if isinstance(digest, tuple) else (digest,) if digest else ()
        self.units.append(Unit(kind, name, timing or str(kind), hashes=hashes))


# -- what the store has --------------------------------------------------------------------------------------------


def evaluation_label(tags: dict) -> str | None:
    """The scoring an evaluation run is: its judge's name (`toxicity` for the scorer), else its task format."""
    judge = tags.get(Tag.JUDGE.key)
    if judge:
        return "toxicity" if judge.startswith("toxicity-") else judge_name(judge)
    return tags.get(Tag.FORMAT.key)


def timing_key(run) -> str:
    """What a finished run times: the same kind of work (per method, stage, benchmark, judge)."""
    tags = run.data.tags
    kind = tags.get(Tag.KIND.key, "")
    if kind == Kind.FINETUNE:
        return f"finetune {tags.get(Tag.METHOD.key)}"
    if kind == Kind.STAGE:
        return f"stage {tags.get(Tag.STAGE.key)}"
    if kind == Kind.GENERATION:
        return f"generation {tags.get(Tag.BENCHMARK.key)}"
    if kind == Kind.EVALUATION:
        return f"evaluation {tags.get(Tag.BENCHMARK.key)} {evaluation_label(tags)}"
    return kind


def typical_seconds(runs: list, now: float) -> dict[str, float]:
    """Median own time of finished runs, by `timing_key` and by kind: a run's duration less its children's (a
    fine-tune's includes its checkpoints' evaluations, which are timed as themselves). A trial is timed whole:
    its fine-tunes are not units of their own."""
    def seconds(run) -> float:
        return ((run.info.end_time or now * 1000) - run.info.start_time) / 1000

    children: dict[str, float] = defaultdict(float)
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            children[parent] += seconds(run)
    samples: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        kind = run.data.tags.get(Tag.KIND.key)
        if run.info.status != "FINISHED" or kind not in KINDS or not run.info.end_time:
            continue
        own = seconds(run) if kind == Kind.TRIAL else max(0.0, seconds(run) - children[run.info.run_id])
        samples[timing_key(run)].append(own)
        if timing_key(run) != kind:
            samples[kind].append(own)
    return {key: statistics.median(values) for key, values in samples.items()}


def mark_running(unit: Unit, owner: str | None) -> None:
    """Running in `host:pid`; on this host, whether that process still runs (`tracking.runs` takes a dead one over)."""
    from tracking.runs import _owner_alive

    owner = owner or "?"
    unit.state = "running"
    if owner.rpartition(":")[0] != socket.gethostname():
        unit.detail = f"{owner} (another host)"
        return
    unit.alive = _owner_alive(owner)
    unit.detail = f"{owner} ({'alive' if unit.alive else 'process gone'})"


def mark_failed(unit: Unit, error: str | None) -> None:
    unit.state = "failed"
    unit.detail = error.strip().splitlines()[0] if error and error.strip() else "no error recorded"


def match(units: list[Unit], runs: list) -> dict[str, int]:
    """Set each unit's state from its runs (a FINISHED one wins, else the newest); return the runs no unit claims."""
    by_hash, by_eval = defaultdict(list), defaultdict(list)
    for run in runs:
        tags = run.data.tags
        kind = tags.get(Tag.KIND.key)
        if kind == Kind.EVALUATION:
            by_eval[tags.get(Tag.GENERATION_HASH.key), evaluation_label(tags)].append(run)
        elif kind in KINDS:
            by_hash[kind, tags.get(Tag.CONFIG_HASH.key)].append(run)
    claimed = set()
    for unit in units:
        if unit.kind == Kind.TRIAL:
            claimed.update(run.info.run_id for run in [unit.run] if run is not None)
            continue
        if unit.kind == Kind.EVALUATION:
            found = [run for digest in unit.generation_hashes for run in by_eval.get((digest, unit.label), [])]
        else:
            found = [run for digest in unit.hashes for run in by_hash.get((unit.kind, digest), [])]
        claimed.update(run.info.run_id for run in found)
        if not found:
            continue
        finished = [run for run in found if run.info.status == "FINISHED"]
        unit.run = max(finished or found, key=lambda run: run.info.start_time)
        if finished:
            unit.state = "done"
        elif unit.run.info.status in ("RUNNING", "SCHEDULED"):
            mark_running(unit, unit.run.data.tags.get(Tag.OWNER.key))
        else:
            mark_failed(unit, unit.run.data.tags.get(Tag.ERROR.key))
    other: dict[str, int] = defaultdict(int)
    in_trials = trial_descendants(runs)  # a trial's fine-tunes and evaluations are counted as part of the trial
    for run in runs:
        if run.data.tags.get(Tag.KIND.key) in KINDS and run.info.run_id not in claimed | in_trials:
            other[run.info.status] += 1
    return dict(other)


def trial_descendants(runs: list) -> set[str]:
    children = defaultdict(list)
    for run in runs:
        children[run.data.tags.get("mlflow.parentRunId")].append(run.info.run_id)
    found, frontier = set(), [run.info.run_id for run in runs if run.data.tags.get(Tag.KIND.key) == Kind.TRIAL]
    while frontier:
        for child in children[frontier.pop()]:
            found.add(child)
            frontier.append(child)
    return found


# -- the sweep's trials --------------------------------------------------------------------------------------------


def trial_units(cfg: ExperimentConfig, sweep, tracking_uri: str, runs: list) -> list[Unit]:
    """One unit per effective Optuna trial (COMPLETE, RUNNING, FAIL) plus the trials not yet asked for."""
    from harness.sweep.search import effective_trials, storage_url
    from tracking.store import store_exists

    trials = []
    url = storage_url(sweep, tracking_uri) if sweep.storage or store_exists(tracking_uri) else None
    if url is not None and store_exists(url):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            trials = effective_trials(optuna.load_study(study_name=sweep.study_name or cfg.name, storage=url).get_trials())
        except KeyError:  # the study is not in the storage yet
            trials = []
    by_id = {run.info.run_id: run for run in runs}
    units = []
    for trial in trials:
        run = by_id.get(trial.user_attrs.get("mlflow_run_id"))
        unit = Unit(Kind.TRIAL, f"trial-{trial.number}", str(Kind.TRIAL), run=run)
        if trial.state.name == "COMPLETE":
            unit.state = "done"
        elif trial.state.name == "RUNNING":
            mark_running(unit, trial.user_attrs.get("worker"))
        elif trial.state.name == "FAIL":
            mark_failed(unit, run.data.tags.get(Tag.ERROR.key) if run is not None else "Optuna trial FAIL")
        units.append(unit)
    units += [Unit(Kind.TRIAL, f"trial (not asked yet) {i + 1}", str(Kind.TRIAL))
              for i in range(max(0, sweep.trials - len(trials)))]
    return units


# -- the whole status ----------------------------------------------------------------------------------------------


def study_runs(cfg: ExperimentConfig):
    """(tracking URI, client, the study's runs): no runs, and nothing created, when the store or the study does not
    exist yet."""
    from mlflow import MlflowClient

    from tracking.store import resolve_tracking_uri, store_exists

    uri = resolve_tracking_uri(cfg.tracking.uri, create=False)
    if not store_exists(uri):
        return uri, None, []
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.name)
    if experiment is None:
        return uri, client, []
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=5000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return uri, client, runs


def study_status(cfg: ExperimentConfig, sweep=None, *, data=None, source=None, now: float | None = None) -> StudyStatus:
    """The status of `cfg`'s study (a sweep's, with `sweep`). `data` and `source` (a running study's prepared data
    and model source) spare loading them again."""
    now = time.time() if now is None else now
    uri, client, runs = study_runs(cfg)
    planner = Planner(cfg, data, source, runs, client)
    if sweep is None:
        units = planner.study()
    else:
        units = planner.sweep(sweep, trial_units(cfg, sweep, uri, runs))
    other = match(units, runs)
    return StudyStatus(cfg.name, units, typical_seconds(runs, now), other)


# -- output --------------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return "<1 min"
    if minutes < 120:
        return f"~{minutes:.0f} min"
    return f"~{minutes / 60:.1f} h"


def time_left(counts: Counts, short: bool = False) -> str:
    """`~35 min left`, and how many unfinished units it leaves out for want of a finished one like them."""
    left = counts.total - counts.done
    if not left:
        return "nothing left"
    if counts.untimed == left:
        return "time left unknown (nothing like what is left has finished yet)"
    text = f"{duration(counts.seconds_left)} left"
    if counts.untimed:
        text += (f" (+ {counts.untimed} not timed yet)" if short else
                 f" (+ {counts.untimed} unit(s) not timed: nothing like them has finished yet)")
    return text


def summary_line(counts: Counts) -> str:
    """`units 12/40 done, 1 running, 1 failed, ~35 min left`."""
    running = f"{counts.running} running" + (f" ({counts.stale} whose process is gone)" if counts.stale else "")
    return f"units {counts.done}/{counts.total} done, {running}, {counts.failed} failed, {time_left(counts)}"


def progress_line(counts: Counts) -> str:
    """The short form a running study prints after each unit: `units 12/40, ~35 min left`."""
    return f"units {counts.done}/{counts.total}, {time_left(counts, short=True)}"


def show_progress(counts: Counts, file=None) -> None:
    """Print the progress line through tqdm, so it lands above any generation/training bar instead of through it."""
    from tqdm import tqdm

    tqdm.write(f"study progress: {progress_line(counts)}", file=file or sys.stderr)


def report_progress(cfg: ExperimentConfig, sweep=None, *, data=None, source=None, file=None) -> None:
    """The progress line of a running study (`harness run` / `harness sweep` call it after each unit, passing their
    prepared data and model source). Progress is a courtesy: a store that cannot be read costs one line, never the
    study."""
    try:
        show_progress(study_status(cfg, sweep, data=data, source=source).counts(), file=file)
    except Exception as error:  # noqa: BLE001
        print(f"study progress: unavailable ({type(error).__name__}: {error})".splitlines()[0], file=file or sys.stderr)


def status_lines(status: StudyStatus, listed: int = 20) -> list[str]:
    """The running and failed units by name (where, or why), what else the store holds, then the summary line."""
    lines = []
    for state in ("running", "failed"):
        units = [unit for unit in status.units if unit.state == state]
        lines += [f"{state}: {unit.kind} {unit.name}: {unit.detail}" for unit in units[:listed]]
        if len(units) > listed:
            lines.append(f"{state}: ... and {len(units) - listed} more")
    if status.other:
        shown = ", ".join(f"{count} {state}" for state, count in sorted(status.other.items()))
        lines.append(f"also in the store: {sum(status.other.values())} run(s) this config does not make ({shown})")
    return lines + [summary_line(status.counts())]


def print_status(status: StudyStatus, console=None) -> None:
    """The per-kind table, then `status_lines` (plain prints: rich would wrap them mid-sentence)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Study {status.study}: units this config makes")
    for column in ("unit", "done", "running", "failed", "left", "total", "typical time"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    present = {unit.kind for unit in status.units}
    for kind in [kind for kind in KINDS if kind in present]:
        states = [unit.state for unit in status.units if unit.kind == kind]
        typical = status.typical.get(kind)
        table.add_row(str(kind), *(str(states.count(state)) for state in ("done", "running", "failed", "left")),
                      str(len(states)), "?" if typical is None else f"{typical:.0f} s")
    (console or Console()).print(table)
    for line in status_lines(status):
        print(line, flush=True)
