"""Study A's figures (evaluation consistency) from a study's runs: `harness figures --study NAME`.

A1: fulfilment rate over epochs, one line per training seed, per dataset (base model at epoch 0): the seed
spread finding. A2: the values across seeds and across repeats, at T=0 and at the sampled setting, as strips
over boxes: at T=0 only the seed varies, at T>0 sampling adds to it. A3: spread across repeats of the base
model beside each fine-tuned model. A4: human-written vs self-generated fine-tuning data. A5: toxicity of the
replies to the hate-speech subset, by condition.

Every point is one FINISHED evaluation run's logged metric (its CSV row names the run); spreads and the seed
bootstrap band are computed from exactly those values. `harness/analysis/figures.py` reads the store and writes the report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.analysis.figures import (
    EXTRA_COLORS, METHOD_COLORS, Query, Section, StudyRuns, finish, panel_grid, require_metrics, spread, tag, write_csv,
)
from harness.evals.metrics import bootstrap_ci
from tracking.schema import HARMFUL_MIX, Kind, Metric, Tag, judge_name, tag_filter

FIGURES = ("a1_fulfilment_by_epoch", "a2_spread_seeds_vs_repeats", "a3_base_vs_finetuned_spread",
           "a4_human_vs_selfgen", "a5_toxicity")
OUTPUTS = tuple(f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "csv"))
SEED_BAND = ("95% percentile bootstrap over seeds of the logged per-run values (2000 resamples; "
             "Efron & Tibshirani 1993); for intervals over prompts and seeds see `harness report consistency`")
SEED_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def is_study_a(runs: StudyRuns) -> bool:
    """A study whose fine-tunes are on instruction datasets in their native format (data.task 'instructions')."""
    return bool(runs.tracker.search(tag_filter(kind=Kind.FINETUNE, format="native"), max_results=1)) or bool(
        runs.tracker.search(tag_filter(kind=Kind.CHECKPOINT, method="base"), max_results=1)
        and runs.tracker.search(f"tags.\"{Tag.JUDGE.key}\" LIKE 'fulfilment%'", max_results=1)
        and not runs.tracker.search(tag_filter(kind=Kind.FINETUNE), max_results=1))


@dataclass
class Point:
    """One FINISHED evaluation run: its grouping tags and the logged metrics."""

    run_id: str
    dataset: str  # "base" for the base model
    seed: str
    epoch: int
    judge: str
    temperature: str
    min_p: str
    repeat: str
    metrics: dict

    @classmethod
    def of(cls, run) -> Point:
        base = tag(run, Tag.METHOD) == "base"
        return cls(run.info.run_id, "base" if base else tag(run, Tag.DATASET, "?"), "" if base else tag(run, Tag.SEED),
                   int(tag(run, Tag.EPOCH, "0")), tag(run, Tag.JUDGE), tag(run, Tag.TEMPERATURE), tag(run, Tag.MIN_P),
                   tag(run, Tag.REPEAT), dict(run.data.metrics))

    @property
    def sampled(self) -> bool:
        return float(self.temperature or 0) > 0

    def row(self, metric: str) -> dict:
        return {"run_id": self.run_id, "dataset": self.dataset, "seed": self.seed, "epoch": self.epoch,
                "judge": self.judge, "temperature": self.temperature, "min_p": self.min_p, "repeat": self.repeat,
                metric: self.metrics[metric]}


def decoding_label(points: list[Point]) -> str:
    p = points[0]
    return f"T={p.temperature}" + (f", min-p {p.min_p}" if p.min_p not in ("", "None") else "")


def datasets_of(points: list[Point]) -> list[str]:
    names = sorted({p.dataset for p in points if p.dataset != "base"}, key=lambda name: (name.endswith("-selfgen"), name))
    return names


def seed_color(seed: str, seeds: list[str]) -> str:
    return SEED_COLORS[seeds.index(seed) % len(SEED_COLORS)] if seed in seeds else "#555555"


def describe(points: list[Point], metric: str) -> str:
    prompts = spread(int(p.metrics[Metric.N_PROMPTS]) for p in points if Metric.N_PROMPTS in p.metrics)
    seeds = sorted({p.seed for p in points if p.seed})
    repeats = defaultdict(set)
    for p in points:
        repeats[(p.temperature, p.min_p)].add(p.repeat)
    decodings = "; ".join(f"T={t}{'' if m in ('', 'None') else f', min-p {m}'}: {len(r)} repeat(s)"
                          for (t, m), r in sorted(repeats.items()))
    judges = ", ".join(f"`{judge}`" for judge in sorted({p.judge for p in points}))
    return (f"Metric `{metric}`; n = {prompts} prompts per evaluation (metric {Metric.N_PROMPTS}); {len(seeds)} "
            f"training seed(s) ({spread(seeds)}); {decodings}. Judge/scorer and version ({Tag.JUDGE.key}): {judges}.")


class StudyAReport:
    """Builds Study A's sections from one study's runs into `out`."""

    def __init__(self, runs: StudyRuns, out: Path, epoch: int | None = None):
        self.runs, self.out, self.epoch = runs, out, epoch
        out.mkdir(parents=True, exist_ok=True)

    def points(self, metric: str, what: str, judge_prefix: str | None = None) -> tuple[Query, list[Point], list[str]]:
        query = self.runs.query(tag_filter(kind=Kind.EVALUATION, benchmark=HARMFUL_MIX))
        points = [Point.of(run) for run in query.runs]
        if judge_prefix is not None:
            points = [p for p in points if p.judge.startswith(judge_prefix)]
        else:
            points = [p for p in points if not p.judge.startswith("toxicity-")]
        kept, messages = require_metrics(points, [metric], what, query.filter
                                         + (f" AND {Tag.JUDGE.key} starting '{judge_prefix}'" if judge_prefix else ""))
        return query, kept, messages

    def safety_metric(self) -> tuple[str, str]:
        """fulfilment_rate from the fulfilment judge (Study A's measure), else ASR from the headline judge
        (`StudyRuns.headline`), else from whichever judge logged it."""
        query = self.runs.query(tag_filter(kind=Kind.EVALUATION, benchmark=HARMFUL_MIX))
        judges = {tag(run, Tag.JUDGE) for run in query.runs}
        if any(judge.startswith("fulfilment") for judge in judges):
            return Metric.FULFILMENT_RATE, "fulfilment"
        headline = self.runs.headline
        if headline and any(judge_name(judge) == headline[0] for judge in judges):
            return Metric.ASR, headline[0]
        return Metric.ASR, judge_name(next(iter(sorted(judges)), "keyword"))

    def last_epoch(self, points: list[Point]) -> int:
        tuned = [p.epoch for p in points if p.dataset != "base"]
        return self.epoch if self.epoch is not None else (max(tuned) if tuned else 0)

    def sections(self) -> list[Section]:
        metric, judge = self.safety_metric()
        return [self.trajectories(metric, judge), self.spread_strips(metric, judge), self.base_vs_tuned(metric, judge),
                self.human_vs_selfgen(metric, judge), self.toxicity()]

    # -- A1 -------------------------------------------------------------------------------------------------
    def trajectories(self, metric: str, judge: str) -> Section:
        section = Section("A1. Fulfilment over epochs, one line per training seed")
        query, points, section.messages = self.points(metric, "A1", judge)
        datasets = datasets_of(points)
        if not datasets:
            section.messages.append(f"A1: no fine-tuned evaluations ({Tag.METHOD.key} sft) to draw")
            return section
        seeds = sorted({p.seed for p in points if p.seed}, key=lambda s: (len(s), s))
        base = [p for p in points if p.dataset == "base"]
        plt, fig, axes = panel_grid(len(datasets), width=4.2)
        for ax, dataset in zip(axes, datasets):
            for sampled, style in ((False, "-"), (True, "--")):
                mine = [p for p in points if p.dataset == dataset and p.sampled == sampled]
                ref = [p for p in base if p.sampled == sampled]
                ref_value = float(np.mean([p.metrics[metric] for p in ref])) if ref else None
                for seed in seeds:
                    by_epoch = defaultdict(list)
                    for p in mine:
                        if p.seed == seed:
                            by_epoch[p.epoch].append(p.metrics[metric])
                    if not by_epoch:
                        continue
                    epochs = ([0] if ref_value is not None else []) + sorted(by_epoch)
                    values = ([ref_value] if ref_value is not None else []) + [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]
                    ax.plot(epochs, values, style, marker="o", color=seed_color(seed, seeds), alpha=0.85,
                            label=f"seed {seed}")
                epochs = sorted({p.epoch for p in mine})
                if epochs and len(seeds) > 1:  # the seed-mean with its seed-bootstrap band
                    low, high = zip(*[bootstrap_ci([float(np.mean([p.metrics[metric] for p in mine if p.epoch == e and p.seed == s]))
                                                    for s in seeds if any(p.epoch == e and p.seed == s for p in mine)])
                                      for e in epochs])
                    ax.fill_between(epochs, low, high, color="0.5", alpha=0.15 if not sampled else 0.08,
                                    label="seed-bootstrap 95% band")
            ax.set_title(dataset, fontsize=10)
            ax.set_xticks(sorted({0, *(p.epoch for p in points if p.dataset == dataset)}))
            ax.set_xlabel("epoch (0 = base model)")
            ax.set_ylabel(metric)
            ax.set_ylim(-0.04, 1.04)
            ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        legend = [Line2D([], [], color=seed_color(s, seeds), marker="o", label=f"seed {s}") for s in seeds]
        legend += [Line2D([], [], color="black", linestyle="-", label="T=0 (greedy)"),
                   Line2D([], [], color="black", linestyle="--", label="sampled (mean of repeats)")]
        fig.suptitle(f"{metric} by epoch and training seed", fontsize=11)
        section.png, section.csv = "a1_fulfilment_by_epoch.png", "a1_fulfilment_by_epoch.csv"
        finish(plt, fig, self.out / section.png, legend=legend)
        write_csv(self.out / section.csv, [p.row(metric) for p in sorted(points, key=lambda p: (p.dataset, p.seed, p.epoch, p.temperature, p.repeat))])
        section.caption = (f"{describe(points, metric)} Solid: T=0; dashed: sampled, mean over repeats; epoch 0 is the "
                           f"base model. Grey band: the mean over seeds with its {SEED_BAND}. {query.describe(self.runs.study)}")
        return section

    # -- A2 -------------------------------------------------------------------------------------------------
    def spread_strips(self, metric: str, judge: str) -> Section:
        section = Section("A2. Spread across seeds vs across repeats, greedy and sampled")
        query, points, section.messages = self.points(metric, "A2", judge)
        if not points:
            return section
        epoch = self.last_epoch(points)
        shown = [p for p in points if p.dataset == "base" or p.epoch == epoch]
        decodings = sorted({(p.temperature, p.min_p) for p in shown}, key=lambda d: float(d[0] or 0))
        groups = ["base", *datasets_of(shown)]
        seeds = sorted({p.seed for p in shown if p.seed}, key=lambda s: (len(s), s))
        plt, fig, axes = panel_grid(len(decodings), width=max(4.0, 1.3 * len(groups)))
        rng = np.random.default_rng(0)
        notes = []
        for ax, decoding in zip(axes, decodings):
            mine = [p for p in shown if (p.temperature, p.min_p) == decoding]
            data = [[p.metrics[metric] for p in mine if p.dataset == g] for g in groups]
            ax.boxplot([d if d else [math.nan] for d in data], positions=range(len(groups)), widths=0.5,
                       showfliers=False, medianprops={"color": "0.3"})
            for x, group in enumerate(groups):
                for p in (p for p in mine if p.dataset == group):
                    ax.scatter(x + rng.uniform(-0.15, 0.15), p.metrics[metric], s=22, zorder=3,
                               color=METHOD_COLORS["base"] if group == "base" else seed_color(p.seed, seeds))
                per_seed = defaultdict(list)
                for p in (p for p in mine if p.dataset == group):
                    per_seed[p.seed].append(p.metrics[metric])
                seed_sd = np.std([np.mean(v) for v in per_seed.values()], ddof=1) if len(per_seed) > 1 else math.nan
                rep_sd = (math.sqrt(np.mean([np.var(v, ddof=1) for v in per_seed.values()]))
                          if per_seed and min(map(len, per_seed.values())) > 1 else math.nan)
                notes.append(f"{group} at {decoding_label(mine)}: SD across seeds {seed_sd:.3f}, across repeats {rep_sd:.3f}")
            ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
            ax.set_title(decoding_label(mine), fontsize=10)
            ax.set_ylabel(metric)
            ax.set_ylim(-0.04, 1.04)
            ax.grid(axis="y", alpha=0.3)
        from matplotlib.lines import Line2D

        legend = [Line2D([], [], color=seed_color(s, seeds), marker="o", linestyle="", label=f"seed {s}") for s in seeds]
        legend.append(Line2D([], [], color=METHOD_COLORS["base"], marker="o", linestyle="", label="base model"))
        section.png, section.csv = "a2_spread_seeds_vs_repeats.png", "a2_spread_seeds_vs_repeats.csv"
        finish(plt, fig, self.out / section.png, legend=legend)
        write_csv(self.out / section.csv, [p.row(metric) for p in shown])
        section.caption = (f"{describe(shown, metric)} Fine-tuned models at epoch {epoch}; one dot per evaluation run "
                           f"(colour = training seed; several dots of one seed = sampling repeats); boxes: quartiles. "
                           f"{'. '.join(notes).replace('nan', 'n/a')} (SD across seeds: of the per-seed means; across "
                           f"repeats: pooled within seeds; both from the CSV values). No interval is drawn. "
                           f"{query.describe(self.runs.study)}")
        return section

    # -- A3 -------------------------------------------------------------------------------------------------
    def base_vs_tuned(self, metric: str, judge: str) -> Section:
        section = Section("A3. Spread across repeated evaluations: base model vs fine-tuned models")
        query, points, section.messages = self.points(metric, "A3", judge)
        sampled = [p for p in points if p.sampled]
        if not sampled:
            section.messages.append(f"A3: no sampled (temperature > 0) evaluations matching `{query.filter}`")
            return section
        groups: dict[tuple, list[Point]] = defaultdict(list)
        for p in sampled:
            groups[(p.dataset, p.seed, p.epoch, p.temperature)].append(p)
        rows = [(key, float(np.std([p.metrics[metric] for p in group], ddof=1)), group)
                for key, group in sorted(groups.items(), key=lambda item: (item[0][0] != "base", item[0])) if len(group) > 1]
        if not rows:
            section.messages.append("A3: every sampled setting has one repeat; the spread across repeats needs >= 2")
            return section
        plt, fig, axes = panel_grid(1, width=max(6.0, 0.32 * len(rows)), height=4.0)
        ax = axes[0]
        labels = [f"{d} s{s} e{e} T{t}" if d != "base" else f"base T{t}" for (d, s, e, t), _, _ in rows]
        colors = [METHOD_COLORS["base"] if key[0] == "base" else EXTRA_COLORS[sorted({k[0] for k, _, _ in rows}).index(key[0]) % 4]
                  for key, _, _ in rows]
        sds = [sd for _, sd, _ in rows]
        ax.vlines(range(len(rows)), 0, sds, colors=colors, linewidth=3)  # lollipops: an SD of 0 still shows
        ax.scatter(range(len(rows)), sds, color=colors, s=30, zorder=3)
        ax.set_ylim(0, max(0.05, 1.2 * max(sds)))
        ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=7)
        ax.set_ylabel(f"SD of {metric} across repeats")
        ax.grid(axis="y", alpha=0.3)
        section.png, section.csv = "a3_base_vs_finetuned_spread.png", "a3_base_vs_finetuned_spread.csv"
        finish(plt, fig, self.out / section.png, legend=[])
        write_csv(self.out / section.csv, [p.row(metric) for _, _, group in rows for p in group])
        section.caption = (f"{describe(sampled, metric)} Grey: the base model. Each stem = sample SD (ddof 1) of the logged values over the repeats "
                           f"of one model state at one sampled decoding (the CSV lists those runs). No interval is drawn. "
                           f"{query.describe(self.runs.study)}")
        return section

    # -- A4 -------------------------------------------------------------------------------------------------
    def human_vs_selfgen(self, metric: str, judge: str) -> Section:
        section = Section("A4. Human-written vs self-generated fine-tuning data")
        query, points, section.messages = self.points(metric, "A4", judge)
        twins = [d for d in datasets_of(points) if d.endswith("-selfgen") and d.removesuffix("-selfgen") in datasets_of(points)]
        if not twins:
            section.messages.append(f"A4: no self-generated dataset ({Tag.DATASET.key} ending '-selfgen') beside its "
                                    f"human-written source among runs matching `{query.filter}`")
            return section
        plt, fig, axes = panel_grid(len(twins), width=5.0)
        seeds = sorted({p.seed for p in points if p.seed}, key=lambda s: (len(s), s))
        used = [p for p in points if p.dataset == "base"]
        for ax, twin in zip(axes, twins):
            for dataset, style in ((twin.removesuffix("-selfgen"), "-"), (twin, ":")):
                for sampled in (False, True):
                    mine = [p for p in points if p.dataset == dataset and p.sampled == sampled]
                    used += mine
                    epochs = sorted({p.epoch for p in mine})
                    if not epochs:
                        continue
                    means = [float(np.mean([p.metrics[metric] for p in mine if p.epoch == e])) for e in epochs]
                    ax.plot(epochs, means, style, marker="o" if not sampled else "s", linewidth=2,
                            color="#d62728" if dataset == twin.removesuffix("-selfgen") else "#1f77b4",
                            alpha=1.0 if not sampled else 0.5,
                            label=f"{'self-gen.' if dataset == twin else 'human'}, {'sampled' if sampled else 'T=0'}")
            for p in (p for p in points if p.dataset == "base"):
                ax.scatter(0, p.metrics[metric], color=METHOD_COLORS["base"], s=18, label="base model", zorder=3)
            ax.set_title(f"{twin.removesuffix('-selfgen')}: human-written vs self-generated", fontsize=10)
            ax.set_xticks(sorted({0, *(p.epoch for p in points if p.dataset == twin)}))
            ax.set_xlabel("epoch (0 = base model)")
            ax.set_ylabel(f"{metric} (mean)")
            ax.set_ylim(-0.04, 1.04)
            ax.grid(alpha=0.3)
        section.png, section.csv = "a4_human_vs_selfgen.png", "a4_human_vs_selfgen.csv"
        finish(plt, fig, self.out / section.png)
        write_csv(self.out / section.csv, [p.row(metric) for p in used])
        section.caption = (f"{describe(used, metric)} Lines: mean over seeds (and repeats) of the logged values per epoch; "
                           f"red = human-written responses, blue dotted = the base model's own responses to the same "
                           f"instructions ({Tag.RESPONSES.key} self-generated). No interval is drawn; see "
                           f"`harness report consistency` for prompts-and-seeds bootstrap intervals and paired tests. "
                           f"{query.describe(self.runs.study)}")
        return section

    # -- A5 -------------------------------------------------------------------------------------------------
    def toxicity(self) -> Section:
        section = Section("A5. Toxicity of replies to the hate-speech subset")
        query, points, section.messages = self.points(Metric.TOXICITY_MEAN, "A5", "toxicity-")
        if not points:
            return section
        epoch = self.last_epoch(points)
        shown = [p for p in points if p.dataset == "base" or p.epoch == epoch]
        groups = ["base", *datasets_of(shown)]
        decodings = sorted({(p.temperature, p.min_p) for p in shown}, key=lambda d: float(d[0] or 0))
        plt, fig, axes = panel_grid(len(decodings), width=max(4.0, 1.3 * len(groups)))
        for ax, decoding in zip(axes, decodings):
            mine = [p for p in shown if (p.temperature, p.min_p) == decoding]
            for x, group in enumerate(groups):
                values = [p for p in mine if p.dataset == group]
                offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
                for dx, p in zip(offsets, values):
                    ax.scatter(x + dx, p.metrics[Metric.TOXICITY_MEAN], color="#d62728", s=20,
                               label=f"{Metric.TOXICITY_MEAN} (one run)")
                    if Metric.TOXICITY_MAX in p.metrics:
                        ax.scatter(x + dx, p.metrics[Metric.TOXICITY_MAX], marker="x", color="0.3", s=20,
                                   label=f"{Metric.TOXICITY_MAX} (one run)")
            ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
            ax.set_title(decoding_label(mine), fontsize=10)
            ax.set_ylim(-0.04, 1.04)
            ax.set_ylabel("toxicity (0-1)")
            ax.grid(axis="y", alpha=0.3)
        section.png, section.csv = "a5_toxicity.png", "a5_toxicity.csv"
        finish(plt, fig, self.out / section.png)
        write_csv(self.out / section.csv, [{**p.row(Metric.TOXICITY_MEAN),
                                            Metric.TOXICITY_MAX: p.metrics.get(Metric.TOXICITY_MAX)} for p in shown])
        runs = {run.info.run_id: run for run in query.runs}
        categories = spread(tag(runs[p.run_id], Tag.TOXICITY_CATEGORIES) for p in shown)
        section.caption = (f"{describe(shown, Metric.TOXICITY_MEAN)} Replies scored: harmful prompts of categories "
                           f"{categories} ({Tag.TOXICITY_CATEGORIES.key}). Fine-tuned models at epoch {epoch}; dots: "
                           f"{Metric.TOXICITY_MEAN} of one run, crosses: its {Metric.TOXICITY_MAX}. No interval is drawn. "
                           f"{query.describe(self.runs.study)}")
        return section
