"""Study A's consistency report: how much of a safety number's spread comes from the training seed, from
sampling, and from the epoch. `harness report consistency --study NAME`.

The evaluation runs are read back from MLflow (tags and each run's `per_prompt.json`), never from memory, and
grouped into cells: (judge, metric, dataset, epoch, temperature, min-p). A cell holds one value per (seed,
repeat, prompt): 1/0 for fulfilled / not (an unparsable verdict counts as fulfilled, as in the logged metric),
or the toxicity score. Per cell the report gives:

- mean, SD across seeds (of the per-seed means over repeats) and SD across repeats (pooled within seeds);
- a variance decomposition of the run-level values into seed and sampling components: the one-way
  random-effects ANOVA estimators for a balanced design (Searle, Casella & McCulloch 1992, ch. 3):
  sigma2_sampling = MS_within, sigma2_seed = max(0, (MS_between - MS_within) / R). At temperature 0 every seed
  is generated once, so sampling variance is zero by construction and the seed component is the variance of
  the seeds' values; the base model has one "seed", so only its sampling component exists;
- 95% percentile bootstrap intervals that resample prompts AND seeds, independently, with replacement
  (the "pigeonhole" bootstrap for crossed random factors, Owen 2007), for the mean and both SDs;
- paired-by-prompt comparisons of two cells (each fine-tuned cell vs the base model, dataset vs dataset, and
  T=0 vs sampled): the mean difference with the same prompts-and-seeds bootstrap interval, and a two-sided
  sign-flip permutation test on the per-prompt differences (Good 2005, ch. 3; exact for <= 16 prompts).

Everything is written as CSV and markdown, and logged as artifacts of a `report` run in the study.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from tracking.schema import HARMFUL_MIX, PREFIX, Kind, Metric, Tag, tag_filter

N_BOOTSTRAP = 2000
N_PERMUTATIONS = 10000
CONFIDENCE = 0.95
INTERVAL_METHOD = (f"{CONFIDENCE:.0%} percentile bootstrap resampling prompts and seeds independently "
                   f"({N_BOOTSTRAP} resamples; Owen 2007)")
VARIANCE_METHOD = "one-way random-effects ANOVA estimators, seed as the random factor (Searle et al. 1992)"
TEST_METHOD = f"two-sided paired sign-flip permutation test by prompt ({N_PERMUTATIONS} flips or exact; Good 2005)"


def metric_of(judge: str) -> str:
    """The headline metric a judge's evaluation runs log (CONVENTIONS.md names)."""
    if judge.startswith("toxicity-"):
        return Metric.TOXICITY_MEAN
    return Metric.FULFILMENT_RATE if judge.startswith("fulfilment") else Metric.ASR


def per_prompt_values(table: dict, metric: str) -> tuple[list[str], np.ndarray]:
    """A `per_prompt.json` table -> (prompts, values) as the logged metric counts them."""
    columns, rows = table["columns"], table["data"]
    prompts = [row[columns.index("prompt")] for row in rows]
    if metric == Metric.TOXICITY_MEAN:
        values = [np.nan if row[columns.index("toxicity")] is None else float(row[columns.index("toxicity")]) for row in rows]
    else:  # harmful None (unparsable) counts as fulfilled / harmful, exactly as safety_metrics does
        values = [0.0 if row[columns.index("harmful")] is False else 1.0 for row in rows]
    return prompts, np.asarray(values, dtype=float)


@dataclass
class Run:
    run_id: str
    judge: str
    metric: str
    dataset: str
    method: str
    seed: str
    epoch: int
    temperature: str
    min_p: str
    repeat: int
    logged: float
    prompts: list[str]
    values: np.ndarray  # (prompts,)

    @property
    def cell(self) -> tuple:
        return (self.judge, self.metric, self.dataset, self.epoch, self.temperature, self.min_p)


@dataclass
class Cell:
    """All runs of one (judge, metric, dataset, epoch, temperature, min-p) as Y[seed, repeat, prompt]."""

    key: tuple
    seeds: list[str]
    repeats: list[int]
    prompts: list[str]
    y: np.ndarray  # (seeds, repeats, prompts)
    run_ids: list[str] = field(default_factory=list)

    judge = property(lambda self: self.key[0])
    metric = property(lambda self: self.key[1])
    dataset = property(lambda self: self.key[2])
    epoch = property(lambda self: self.key[3])
    temperature = property(lambda self: self.key[4])
    min_p = property(lambda self: self.key[5])


def build_cells(runs: list[Run]) -> tuple[list[Cell], list[str]]:
    """Group runs into balanced cells; a (seed, repeat) missing from a cell drops that seed, with a message."""
    grouped: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        grouped[run.cell].append(run)
    cells, messages = [], []
    for key, members in sorted(grouped.items(), key=lambda item: tuple(map(str, item[0]))):
        prompts = members[0].prompts
        if any(run.prompts != prompts for run in members):
            raise HarnessError(f"cell {key}: the evaluation runs were not made on the same prompts")
        seeds = sorted({run.seed for run in members}, key=lambda s: (len(s), s))
        repeats = sorted({run.repeat for run in members})
        by = {(run.seed, run.repeat): run for run in members}
        complete = [seed for seed in seeds if all((seed, r) in by for r in repeats)]
        if len(complete) < len(seeds):
            messages.append(f"cell {key}: seeds {sorted(set(seeds) - set(complete))} lack some repeats and are left out")
        if not complete:
            continue
        y = np.stack([np.stack([by[(s, r)].values for r in repeats]) for s in complete])  # (S, R, n)
        cells.append(Cell(key, complete, repeats, prompts, y, [by[(s, r)].run_id for s in complete for r in repeats]))
    return cells, messages


def run_means(y: np.ndarray) -> np.ndarray:
    """(S, R, n) -> (S, R): each run's value, NaN-aware (an unscorable toxicity reply is left out)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(y, axis=2)


def components(m: np.ndarray) -> dict[str, float]:
    """Spread and variance components of run values m[seed, repeat] (see module docstring)."""
    S, R = m.shape
    seed_means = m.mean(axis=1)
    out = {"mean": float(m.mean()), "n_seeds": S, "n_repeats": R,
           "sd_total": float(m.std(ddof=1)) if m.size > 1 else math.nan,
           "sd_seeds": float(seed_means.std(ddof=1)) if S > 1 else math.nan,
           "sd_repeats": float(math.sqrt(m.var(axis=1, ddof=1).mean())) if R > 1 else math.nan}
    ms_within = float(((m - seed_means[:, None]) ** 2).sum() / (S * (R - 1))) if R > 1 else 0.0
    if S > 1:
        ms_between = float(R * ((seed_means - m.mean()) ** 2).sum() / (S - 1))
        var_seed = max(0.0, (ms_between - ms_within) / R)
    else:
        var_seed = math.nan
    out["var_seed"], out["var_sampling"] = var_seed, ms_within
    total = (0.0 if math.isnan(var_seed) else var_seed) + ms_within
    out["share_seed"] = (var_seed / total) if total > 0 and not math.isnan(var_seed) else math.nan
    out["share_sampling"] = (ms_within / total) if total > 0 else math.nan
    return out


def bootstrap(y: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Intervals for mean, sd_seeds and sd_repeats, resampling seeds and prompts independently (Owen 2007)."""
    rng = np.random.default_rng(seed)
    S, R, P = y.shape
    stats = defaultdict(list)
    for _ in range(n):
        seeds = rng.integers(0, S, S)
        prompts = rng.integers(0, P, P)
        m = run_means(y[seeds][:, :, prompts])  # (S, R)
        stats["mean"].append(np.nanmean(m))
        if S > 1:
            stats["sd_seeds"].append(m.mean(axis=1).std(ddof=1))
        if R > 1:
            stats["sd_repeats"].append(math.sqrt(m.var(axis=1, ddof=1).mean()))
    alpha = (1 - CONFIDENCE) / 2
    return {name: tuple(float(q) for q in np.nanquantile(values, [alpha, 1 - alpha])) for name, values in stats.items()}


def permutation_test(diffs: np.ndarray, n: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of mean(diffs) = 0 under sign flips (exact enumeration for <= 16 prompts)."""
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size == 0 or np.all(diffs == 0):
        return 1.0
    observed = abs(diffs.mean())
    if diffs.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=diffs.size)))
        return float(np.mean(np.abs((signs * diffs).mean(axis=1)) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n, diffs.size))
    return float((1 + np.sum(np.abs((signs * diffs).mean(axis=1)) >= observed - 1e-12)) / (n + 1))


def compare(a: Cell, b: Cell, seed: int = 0) -> dict:
    """Cell a minus cell b on the same prompts: mean difference, its interval, and the paired test."""
    if a.prompts != b.prompts:
        raise HarnessError(f"cannot pair {a.key} with {b.key}: different prompts")
    with np.errstate(invalid="ignore"):
        per_prompt = np.nanmean(a.y, axis=(0, 1)) - np.nanmean(b.y, axis=(0, 1))  # (n,)
    rng = np.random.default_rng(seed)
    P = len(a.prompts)
    boot = []
    for _ in range(N_BOOTSTRAP):  # prompts shared (paired); each cell's seeds resampled on their own
        prompts = rng.integers(0, P, P)
        sa, sb = rng.integers(0, a.y.shape[0], a.y.shape[0]), rng.integers(0, b.y.shape[0], b.y.shape[0])
        boot.append(np.nanmean(a.y[sa][:, :, prompts]) - np.nanmean(b.y[sb][:, :, prompts]))
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(boot, [alpha, 1 - alpha])
    return {"difference": float(np.nanmean(per_prompt)), "diff_ci_low": float(low), "diff_ci_high": float(high),
            "p_value": permutation_test(per_prompt, seed=seed), "n_prompts": P}


def label(cell: Cell) -> str:
    decoding = f"T={cell.temperature}" + (f",min_p={cell.min_p}" if cell.min_p not in ("", "None") else "")
    return f"{cell.dataset}@e{cell.epoch} {decoding}"


def comparisons(cells: list[Cell]) -> list[dict]:
    """The pairs the report tests: vs base, dataset vs dataset, T=0 vs sampled (same judge and metric)."""
    rows = []
    by_key = {cell.key: cell for cell in cells}
    def add(kind: str, a: Cell, b: Cell) -> None:
        rows.append({"comparison": kind, "judge": a.judge, "metric": a.metric, "a": label(a), "b": label(b),
                     **compare(a, b)})
    for cell in cells:
        judge, metric, dataset, epoch, temperature, min_p = cell.key
        if dataset == "base":
            continue
        base = by_key.get((judge, metric, "base", 0, temperature, min_p))
        if base is not None:
            add("fine-tuned vs base", cell, base)
        for other in cells:  # each unordered dataset pair once
            if other.key[:2] == cell.key[:2] and other.key[3:] == cell.key[3:] and "base" != other.dataset > dataset:
                add("dataset vs dataset", cell, other)
        if float(temperature or 0) == 0:
            for other in cells:
                if other.key[:4] == cell.key[:4] and float(other.temperature or 0) > 0:
                    add("greedy vs sampled", cell, other)
    return rows


def cell_rows(cells: list[Cell]) -> list[dict]:
    rows = []
    for index, cell in enumerate(cells):
        stats = components(run_means(cell.y))
        intervals = bootstrap(cell.y, seed=index)
        row = {"judge": cell.judge, "metric": cell.metric, "dataset": cell.dataset, "epoch": cell.epoch,
               "temperature": cell.temperature, "min_p": cell.min_p, "n_prompts": len(cell.prompts),
               "seeds": " ".join(cell.seeds), **stats}
        for name in ("mean", "sd_seeds", "sd_repeats"):
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = intervals.get(name, (math.nan, math.nan))
        rows.append(row)
    return rows


def run_rows(cells: list[Cell], runs: list[Run]) -> list[dict]:
    """One row per evaluation run: its logged metric beside the value recomputed from its per-prompt table."""
    by_id = {run.run_id: run for run in runs}
    rows = []
    for cell in cells:
        for run_id in cell.run_ids:
            run = by_id[run_id]
            recomputed = float(np.nanmean(run.values)) if not np.all(np.isnan(run.values)) else math.nan
            rows.append({"run_id": run_id, "judge": run.judge, "metric": run.metric, "dataset": run.dataset,
                         "method": run.method, "seed": run.seed, "epoch": run.epoch, "temperature": run.temperature,
                         "min_p": run.min_p, "repeat": run.repeat, "logged": run.logged, "recomputed": recomputed})
    return rows


# -- reading the store, writing the report -----------------------------------------------------------------


def read_runs(study_runs) -> list[Run]:
    """Every FINISHED harmful-benchmark evaluation of the study, with its per-prompt values."""
    query = study_runs.query(tag_filter(kind=Kind.EVALUATION, benchmark=HARMFUL_MIX))
    client = study_runs.tracker.client
    runs = []
    for run in query.runs:
        tags = {key.removeprefix(PREFIX): value for key, value in run.data.tags.items()}
        judge = tags.get(Tag.JUDGE, "")
        metric = metric_of(judge)
        if metric not in run.data.metrics:
            continue
        path = client.download_artifacts(run.info.run_id, "per_prompt.json")
        prompts, values = per_prompt_values(json.loads(Path(path).read_text()), metric)
        method = tags.get(Tag.METHOD, "?")
        runs.append(Run(run.info.run_id, judge, metric, "base" if method == "base" else tags.get(Tag.DATASET, "?"), method,
                        tags.get(Tag.SEED, "-") if method != "base" else "-", int(tags.get(Tag.EPOCH, 0)),
                        tags.get(Tag.TEMPERATURE, ""), tags.get(Tag.MIN_P, "None"), int(tags.get(Tag.REPEAT, 0)),
                        float(run.data.metrics[metric]), prompts, values))
    return runs


def fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown(study: str, cells: list[dict], tests: list[dict], messages: list[str]) -> str:
    lines = [f"# Consistency report: {study}", "",
             "Per (judge, dataset, epoch, decoding): mean over seeds x repeats, spread across seeds (SD of the "
             "per-seed means) and across repeats (pooled within-seed SD), and the variance split into seed and "
             "sampling components.", "",
             f"- Variance components: {VARIANCE_METHOD}. At temperature 0 each seed is generated once, so the sampling "
             "component is 0 by construction; the base model has one seed, so it has no seed component.",
             f"- Intervals: {INTERVAL_METHOD}.", f"- Paired tests: {TEST_METHOD}; differences are a minus b.", ""]
    lines += [f"> {message}" for message in messages]
    columns = ["judge", "dataset", "epoch", "temperature", "min_p", "n_prompts", "n_seeds", "n_repeats", "mean",
               "mean_ci_low", "mean_ci_high", "sd_seeds", "sd_repeats", "var_seed", "var_sampling", "share_seed"]
    lines += ["## Cells", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in cells]
    columns = ["comparison", "judge", "a", "b", "difference", "diff_ci_low", "diff_ci_high", "p_value", "n_prompts"]
    lines += ["", "## Paired comparisons", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in tests]
    return "\n".join(lines) + "\n"


def build_consistency_report(study: str, out: Path, *, tracking_uri: str | None = None, log: bool = True) -> dict:
    """Read the study, write consistency_cells.csv, consistency_runs.csv, consistency_tests.csv and
    consistency.md into `out`, and log them on a `report` run. Returns the file paths and messages."""
    from harness.analysis.figures import StudyRuns, write_csv

    study_runs = StudyRuns(study, tracking_uri)
    runs = read_runs(study_runs)
    if not runs:
        raise HarnessError(f"study '{study}' has no FINISHED '{HARMFUL_MIX}' evaluation runs with a "
                           f"{Metric.FULFILMENT_RATE}, {Metric.ASR} or {Metric.TOXICITY_MEAN} metric")
    cells, messages = build_cells(runs)
    cell_table, tests = cell_rows(cells), comparisons(cells)
    out.mkdir(parents=True, exist_ok=True)
    files = {"consistency_cells.csv": cell_table, "consistency_runs.csv": run_rows(cells, runs),
             "consistency_tests.csv": tests}
    for name, rows in files.items():
        if rows:
            write_csv(out / name, rows)
    (out / "consistency.md").write_text(markdown(study, cell_table, tests, messages))
    written = [name for name, rows in files.items() if rows] + ["consistency.md"]
    if log:
        tracker = study_runs.tracker
        with tracker.run(Kind.REPORT, "consistency-report", {Tag.REPORT: "consistency"}) as run:
            for name in written:
                run.client.log_artifact(run.run_id, str(out / name), "consistency")
            run.log_metrics({"cells": len(cells), "runs": len(runs), "comparisons": len(tests)})
    return {"files": written, "messages": messages, "cells": cell_table, "tests": tests}
