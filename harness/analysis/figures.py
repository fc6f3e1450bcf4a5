"""The papers' figures and tables, drawn from a study's MLflow runs: `harness figures --study NAME --out DIR`.

The command reads the study back through the tracking layer's query API (`Tracker.search` filter strings,
`MlflowClient.get_metric_history`; never SQL) and writes every figure as a PNG with its data as a CSV, plus
`report.md` and `report.html` that place them with captions. Each caption gives n (prompts, seeds, repeats),
the judge and its version, the interval method and the exact filter string behind its numbers.

Two rules keep the figures honest:
- The runs decide what is drawn: formats, methods, judges, seeds and epochs come from their `harness.*`
  tags, never from run ids (the lists below only order them). What the store lacks is one line in the
  report (and on stderr) naming the missing metric or run kind, not an empty plot.
- Nothing is recomputed. ASR, over-refusal and their intervals, ROUGE-L and S-BERT are the values the
  evaluation runs logged; only FINISHED runs count, and the report says how many others were skipped.

A sweep's trials live in the same study: what a trial fine-tuned at its own sampled settings is drawn only in
the sweep's figure, never as an arm of the study (a ProMoT at five learning rates is not one `promot` point). A
fine-tune that `harness run` reused from a trial (`harness.study_arm=True`: the same unit) is an arm again.

ProMoT evaluated *with* its soft prompt attached (`harness.soft_prompt=True`) is drawn as its own method,
`promot+prompt`, beside `promot` (evaluated without it, as the paper does), never mixed into it.

This module reads the store and holds what every figure shares (selection, captions, drawing, the report);
each study's figures are their own module (`figures_study_a.py`, `figures_study_b.py`, `figures_sweep.py`),
which imports its shared parts from here; this module imports them only inside `build_report`, so the
import graph has no cycle at load time. Tag, kind, benchmark and metric names come from `tracking/schema.py`.
"""

from __future__ import annotations

import csv
import html
import inspect
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

from harness.errors import HarnessError
from harness.evals.metrics import bootstrap_ci
from tracking import Tracker, resolve_tracking_uri
from tracking.store import store_exists
from tracking.schema import (HARMFUL_MIX, ExperimentTag, Kind, Metric, Tag, judge_name, loads_tag,
                             of_current_selection)
from tracking.schema import tag_filter  # noqa: F401  (re-exported: `figures.tag_filter` predates the schema)

FORMAT_ORDER = ("prose", "list", "json", "native")
METHOD_ORDER = ("base", "sft", "promot", "promot+prompt")
FORMAT_COLORS = {"prose": "#2ca02c", "list": "#ff7f0e", "json": "#9467bd", "native": "#8c564b"}
METHOD_COLORS = {"base": "#555555", "sft": "#d62728", "promot": "#1f77b4", "promot+prompt": "#17becf"}
METHOD_LINES = {"sft": "-", "promot": "--", "promot+prompt": ":"}
EXTRA_COLORS = ("#e377c2", "#bcbd22", "#7f7f7f", "#8c564b")

_BOOTSTRAP = inspect.signature(bootstrap_ci).parameters  # the defaults every logged interval was made with
INTERVAL = (f"{_BOOTSTRAP['confidence'].default:.0%} percentile bootstrap over prompts "
            f"({_BOOTSTRAP['n_resamples'].default} resamples; Efron & Tibshirani 1993), as logged by each run")


# -- reading the store ---------------------------------------------------------------------------------


@dataclass
class Query:
    """One filter string's FINISHED runs, and how many runs it matched that were not FINISHED."""

    filter: str
    runs: list
    skipped: Counter = field(default_factory=Counter)
    sweep_only: int = 0
    other_selection: int = 0
    """FINISHED evaluations made on another prompt selection than the study's current one (issue 20)."""

    def describe(self, study: str) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{status} {count}" for status, count in sorted(self.skipped.items()))
        trials = f"; {self.sweep_only} of sweep trials left to the sweep figure" if self.sweep_only else ""
        return (f"Query: experiment `{study}`, filter `{self.filter}`; FINISHED runs only ({len(self.runs)} used, "
                f"{skipped} non-FINISHED skipped{': ' + detail if detail else ''}{trials}){self.selection_note()}.")

    def selection_note(self) -> str:
        if not self.other_selection:
            return ""
        return (f"; {self.other_selection} evaluation{'s' if self.other_selection > 1 else ''} of earlier prompt "
                f"selections {'are' if self.other_selection > 1 else 'is'} not drawn (the study's current selection, "
                f"`{ExperimentTag.CURRENT_SELECTION}`, is the last `harness run` config's)")


class StudyRuns:
    """A study's runs in a tracking store, read only: a missing store or study is an error, never created."""

    def __init__(self, study: str, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.study = study
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        if not store_exists(self.tracking_uri):
            raise HarnessError(f"no tracking store at {self.tracking_uri.removeprefix('sqlite:///')} (give --tracking-uri)")
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if client.get_experiment_by_name(study) is None:
            names = sorted(exp.name for exp in client.search_experiments() if exp.name != "Default")
            raise HarnessError(
                f"no study '{study}' in {self.tracking_uri} (studies there: {', '.join(names) or 'none'})")
        self.tracker = Tracker(study, self.tracking_uri)  # the experiment exists, so nothing is created

    def query(self, filter_string: str) -> Query:
        matched = self.tracker.search(filter_string)
        runs = [run for run in matched if run.info.run_id not in self.sweep_only]
        finished = [run for run in runs if run.info.status == "FINISHED"]
        current = [run for run in finished if of_current_selection(run.data.tags, self.current_selection)]
        return Query(filter_string, current, Counter(run.info.status for run in runs if run.info.status != "FINISHED"),
                     sweep_only=len(matched) - len(runs), other_selection=len(finished) - len(current))

    @cached_property
    def current_selection(self) -> dict[str, str]:
        """Benchmark → the prompt selection of the study's latest `harness run`; older ones are not drawn."""
        return loads_tag(self.tracker.experiment_tag(ExperimentTag.CURRENT_SELECTION))

    @cached_property
    def headline(self) -> tuple[str, str] | None:
        """(judge name, reason): whose ASR the figures lead with. The study's latest `harness run` recorded it
        (`ExperimentTag.HEADLINE_JUDGE`); a study made before that is resolved now, as the runner would, from the
        judges its harmful-mix evaluations name (alphabetical: the config's order is not in the store)."""
        recorded = self.tracker.experiment_tag(ExperimentTag.HEADLINE_JUDGE)
        if recorded:
            return recorded, self.tracker.experiment_tag(ExperimentTag.HEADLINE_JUDGE_REASON) or recorded
        from harness.judges.validation import headline_judge

        runs = self.query(tag_filter(kind=Kind.EVALUATION, benchmark=HARMFUL_MIX)).runs
        judges = sorted({tag(run, Tag.JUDGE) for run in runs} - {""})
        judges = [tuple(judge.split(":", 1)) for judge in judges if ":" in judge and not judge.startswith("toxicity-")]
        return headline_judge(self.tracker, judges) if judges else None

    @cached_property
    def sweep_only(self) -> set[str]:
        """Runs made by a sweep trial at its own settings: its fine-tunes (unless `harness run` reused one as a
        study arm) and everything below them. The trial runs themselves stay (the sweep figure reads them)."""
        everything = self.tracker.search("")
        kind = {run.info.run_id: run.data.tags.get(Tag.KIND.key) for run in everything}
        below: dict[str, list] = {}
        for run in everything:
            below.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
        frontier = [run.info.run_id for run in everything
                    if kind.get(run.data.tags.get("mlflow.parentRunId")) == Kind.TRIAL
                    and run.data.tags.get(Tag.STUDY_ARM.key) != "True"]
        found: set[str] = set()
        while frontier:
            run_id = frontier.pop()
            found.add(run_id)
            frontier += [child.info.run_id for child in below.get(run_id, [])]
        return found

    def history(self, run_id: str, metric: str) -> list:
        """A metric's logged points in step order (a resumed run continues its curve; see tracking/runs.py)."""
        points = self.tracker.client.get_metric_history(run_id, metric)
        return sorted(points, key=lambda point: (point.step, point.timestamp))


def tag(run, name: Tag | str, default: str = "") -> str:
    """A run's `harness.<name>` tag; `name` must be a schema tag (`Tag.EPOCH`, or its short name)."""
    return run.data.tags.get(Tag(name).key, default)


def method_of(run) -> str:
    """`promot+prompt` for an evaluation with the soft prompt attached: its own method in every figure."""
    method = tag(run, Tag.METHOD, "?")
    return f"{method}+prompt" if tag(run, Tag.SOFT_PROMPT) == "True" else method


def ordered(values, order) -> list:
    """Known values in the papers' order, then any others alphabetically (a new format or method still shows)."""
    values = set(values)
    return [value for value in order if value in values] + sorted(values - set(order))


def color(mapping: dict, key: str, others: list) -> str:
    if key in mapping:
        return mapping[key]
    return EXTRA_COLORS[others.index(key) % len(EXTRA_COLORS)] if key in others else EXTRA_COLORS[0]


@dataclass
class Evaluation:
    """One FINISHED evaluation run, flattened to what the figures group by, with the metrics it logged."""

    run_id: str
    method: str
    format: str  # "" where the run has none (the base model on the harmful mix)
    seed: str  # "" for the base model
    epoch: int
    judge: str
    validation: str
    temperature: str
    repeat: str
    metrics: dict[str, float]
    params: dict[str, str]

    @classmethod
    def of(cls, run) -> Evaluation:
        return cls(
            run.info.run_id, method_of(run), tag(run, Tag.FORMAT), tag(run, Tag.SEED), int(tag(run, Tag.EPOCH, "0")),
            tag(run, Tag.JUDGE), tag(run, Tag.JUDGE_VALIDATION), tag(run, Tag.TEMPERATURE), tag(run, Tag.REPEAT),
            dict(run.data.metrics), dict(run.data.params),
        )

    @property
    def replicate(self) -> tuple[str, str, str]:
        """What tells two points of one format × method apart: seed, decoding temperature, repeat."""
        return self.seed, self.temperature, self.repeat

    def row(self, metrics: list[str]) -> dict:
        """A CSV row: the run id (to audit it in MLflow), its tags, and the logged values, unrounded."""
        return {"run_id": self.run_id, "method": self.method, "format": self.format, "seed": self.seed,
                "epoch": self.epoch, "judge": self.judge, "temperature": self.temperature, "repeat": self.repeat,
                **{name: self.metrics[name] for name in metrics}}


def require_metrics(items: list, metrics: list[str], what: str, filter_string: str,
                    has=lambda item, name: name in item.metrics) -> tuple[list, list[str]]:
    """Keep the items that logged every metric; one message per metric that some or all of them lack."""
    if not items:
        return [], [f"{what}: no FINISHED runs match `{filter_string}`"]
    messages, kept = [], list(items)
    for name in metrics:
        lacking = [item for item in items if not has(item, name)]
        if len(lacking) == len(items):
            messages.append(
                f"{what}: metric '{name}' is in none of the {len(items)} FINISHED runs matching `{filter_string}`")
        elif lacking:
            messages.append(f"{what}: {len(lacking)} of {len(items)} runs lack metric '{name}' and are left out")
        kept = [item for item in kept if has(item, name)]
    return kept, messages


def sort_rows(evaluations: list[Evaluation]) -> list[Evaluation]:
    """CSV and table order: method, then format, in the papers' order; then judge and replicate."""
    methods = ordered({ev.method for ev in evaluations}, METHOD_ORDER)
    formats = ordered({ev.format for ev in evaluations}, ("", *FORMAT_ORDER))
    return sorted(evaluations, key=lambda ev: (methods.index(ev.method), formats.index(ev.format), ev.judge,
                                               ev.replicate, ev.epoch))


def select_epoch(evaluations: list[Evaluation], epoch: int | None) -> list[Evaluation]:
    """Base rows, plus each fine-tune's last evaluated epoch (or exactly `epoch`)."""
    base = [ev for ev in evaluations if ev.method == "base"]
    tuned = [ev for ev in evaluations if ev.method != "base"]
    if epoch is not None:
        return base + [ev for ev in tuned if ev.epoch == epoch]
    last: dict[tuple, int] = {}
    for ev in tuned:
        key = (ev.method, ev.format, ev.seed)
        last[key] = max(last.get(key, ev.epoch), ev.epoch)
    return base + [ev for ev in tuned if ev.epoch == last[(ev.method, ev.format, ev.seed)]]


# -- caption parts ----------------------------------------------------------------------------------------


def spread(values) -> str:
    values = sorted(set(values), key=lambda value: (len(str(value)), str(value)))
    return ", ".join(str(value) for value in values) if values else "none"


def describe_n(evaluations: list[Evaluation]) -> str:
    prompts = spread(int(ev.metrics[Metric.N_PROMPTS]) for ev in evaluations if Metric.N_PROMPTS in ev.metrics)
    seeds = {ev.seed for ev in evaluations if ev.seed}
    return (f"n = {prompts} prompts per evaluation (metric {Metric.N_PROMPTS}); {len(seeds)} seed(s) ({spread(seeds)}); "
            f"repeat(s) {spread(ev.repeat for ev in evaluations)}; "
            f"temperature {spread(ev.temperature for ev in evaluations)}")


def describe_judges(evaluations: list[Evaluation]) -> str:
    judges = sorted({(ev.judge, ev.validation or "none") for ev in evaluations})
    return "; ".join(f"judge `{judge}` ({Tag.JUDGE.key}; human-label validation: {validation})"
                     for judge, validation in judges)


def describe_methods(evaluations: list[Evaluation]) -> str:
    methods = ordered({ev.method for ev in evaluations}, METHOD_ORDER)
    if "promot+prompt" in methods:
        note = f"promot+prompt = ProMoT evaluated with its soft prompt attached ({Tag.SOFT_PROMPT.key}=True), apart"
    else:
        note = f"no soft-prompt evaluations ({Tag.SOFT_PROMPT.key}) in the store"
    epochs = spread(ev.epoch for ev in evaluations if ev.method != "base")
    return f"Methods: {', '.join(methods)} ({note}); fine-tuned epoch(s) shown: {epochs}, base = epoch 0"


# -- drawing -----------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, width: float = 4.4, height: float = 3.8):
    """One row of `n` panels; never narrower than 8 inches, or one panel's title and legend would be cut."""
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(max(width * n, 8.0), height), squeeze=False)
    return plt, fig, list(axes[0])


def finish(plt, fig, path: Path, legend: list | None = None) -> None:
    """One legend for the whole figure under the panels (the panels' labels, or `legend`'s handles), then save."""
    handles: dict[str, object] = {}
    for ax in fig.axes if legend is None else []:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    handles.update({handle.get_label(): handle for handle in legend or []})
    bottom = 0.0
    if handles:
        columns = min(len(handles), max(2, int(fig.get_figwidth() / 1.6)))
        bottom = min(0.4, 0.07 * -(-len(handles) // columns) + 0.04)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_key(formats: list[str], styles: dict[str, str], labels: dict[str, str]) -> list:
    """Legend proxies: one colour per format, one line style per method or loss class (not every combination)."""
    from matplotlib.lines import Line2D

    return ([Line2D([], [], color=color(FORMAT_COLORS, fmt, formats), marker="o", label=fmt) for fmt in formats]
            + [Line2D([], [], color="black", linestyle=style, label=labels.get(name, name))
               for name, style in styles.items()])


def short_judge(judge: str, width: int = 38) -> str:
    return "\n".join(textwrap.wrap(judge, width)) or "(no judge)"


def headline_first(judges, headline: str | None) -> list[str]:
    """Judge tags in order, the headline judge's (`StudyRuns.headline`) first: its panel is the one to read."""
    return sorted(judges, key=lambda judge: judge_name(judge) != headline)


def judge_title(judge: str, headline: str | None) -> str:
    """A panel's judge line(s); the headline judge's panel says so."""
    return ("headline judge\n" if judge_name(judge) == headline else "") + short_judge(judge)


# -- the figures and tables --------------------------------------------------------------------------------


@dataclass
class Section:
    """One figure or table of the report: its files, caption, and any message about what is missing."""

    title: str
    caption: str = ""
    png: str | None = None
    csv: str | None = None
    table_md: str | None = None
    messages: list[str] = field(default_factory=list)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


# -- the report ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    study: str
    tracking_uri: str
    sections: list[Section]
    status_counts: Counter
    files: list[str]
    title: str = "Study B figures"
    headline: tuple[str, str] | None = None
    """(judge, reason) from `StudyRuns.headline`."""

    @property
    def messages(self) -> list[str]:
        return [message for section in self.sections for message in section.messages]


def build_report(study: str, out: Path, *, tracking_uri: str | None = None, epoch: int | None = None) -> Report:
    """Every Study B figure and table the study's runs support, plus report.md and report.html, into `out`."""
    runs = StudyRuns(study, tracking_uri)
    # Earlier `report` runs are this command's own output, not the study's: they are not counted.
    everything = [run for run in runs.tracker.search("") if run.data.tags.get(Tag.KIND.key) != Kind.REPORT]
    statuses = Counter(run.info.status for run in everything)
    if not statuses.get("FINISHED"):
        raise HarnessError(
            f"study '{study}' has no FINISHED runs in {runs.tracking_uri} ({sum(statuses.values())} runs in all)")
    # The study modules import their shared parts from this one: imported here, not at the top, so the
    # import graph has no cycle (figures_study_a/b and figures_sweep -> figures, never back at load time).
    from harness.analysis import figures_study_a
    from harness.analysis import figures_study_b
    from harness.analysis import figures_sweep

    # Study A (instruction datasets in their native format) or Study B (formats): the runs' tags decide.
    study_a = figures_study_a.is_study_a(runs)
    title, OUTPUTS = ("Study A figures", figures_study_a.OUTPUTS) if study_a else ("Study B figures", figures_study_b.OUTPUTS)
    builder = figures_study_a.StudyAReport if study_a else figures_study_b.StudyBReport
    sections = builder(runs, Path(out), epoch).sections()
    sections += figures_sweep.sweep_sections(runs, Path(out))  # Optuna sweeps of this study (none: no sections)
    written = sorted(name for section in sections for name in (section.png, section.csv) if name)
    for stale in set(OUTPUTS) - set(written):  # drawn by an earlier call, not supported by the store now
        Path(out, stale).unlink(missing_ok=True)
    report = Report(study, runs.tracking_uri, sections, statuses, [*written, "report.html", "report.md"], title,
                    runs.headline)
    Path(out, "report.md").write_text(render_markdown(report))
    Path(out, "report.html").write_text(render_html(report))
    return report


def summary_lines(report: Report) -> list[str]:
    skipped = {status: count for status, count in report.status_counts.items() if status != "FINISHED"}
    detail = ", ".join(f"{status} {count}" for status, count in sorted(skipped.items()))
    return [
        f"Study `{report.study}` in `{report.tracking_uri}`, drawn {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`harness figures`. All numbers are the metrics the runs logged (nothing is recomputed); every CSV row names "
        f"the run it came from.",
        f"Runs in the study: {sum(report.status_counts.values())}; FINISHED (used): "
        f"{report.status_counts.get('FINISHED', 0)}; non-FINISHED skipped: {sum(skipped.values())}"
        + (f" ({detail})" if detail else "") + ".",
        f"Soft-prompt evaluations ({Tag.SOFT_PROMPT.key}=True) are shown separately as `promot+prompt`, never mixed "
        "into `promot`.",
    ] + ([f"Headline judge: {report.headline[1]}; where ASR is drawn per judge, its panel comes first."]
         if report.headline else [])


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}: {report.study}", "", *[f"{line}  " for line in summary_lines(report)], ""]
    if report.messages:
        lines += ["## Missing from the store", "", *[f"- {message}" for message in report.messages], ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        if section.png:
            lines += [f"![{section.title}]({section.png})", ""]
        if section.table_md:
            lines += [section.table_md, ""]
        if section.caption:
            lines += [f"*{section.caption}*", ""]
        if section.csv:
            lines += [f"Data: [{section.csv}]({section.csv})", ""]
        lines += [f"> **Not drawn / incomplete:** {message}" for message in section.messages]
        lines += [""] if section.messages else []
    return "\n".join(lines)


def inline_code(text: str) -> str:
    """Markdown-ish `code` spans in captions to <code> (the captions are our own text: escaped, then marked up)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if index % 2 else part for index, part in enumerate(parts))


def markdown_table_html(table: str) -> str:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    head, body = rows[0], rows[2:]
    cells = "".join(f"<th>{html.escape(cell)}</th>" for cell in head)
    out = [f"<table><thead><tr>{cells}</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body]
    return "".join(out) + "</tbody></table>"


def render_html(report: Report) -> str:
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}img{max-width:100%}"
             "figcaption{font-size:.9em;color:#333}.missing{color:#a00}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}code{background:#f3f3f3}")
    title = f"{html.escape(report.title)}: {html.escape(report.study)}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
             f"<body><h1>{title}</h1>"]
    parts += [f"<p>{inline_code(line)}</p>" for line in summary_lines(report)]
    if report.messages:
        parts.append("<h2>Missing from the store</h2><ul>" + "".join(
            f"<li class='missing'>{inline_code(message)}</li>" for message in report.messages) + "</ul>")
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><figure>")
        if section.png:
            parts.append(f"<img src='{html.escape(section.png)}' alt='{html.escape(section.title)}'>")
        if section.table_md:
            parts.append(markdown_table_html(section.table_md))
        if section.caption:
            parts.append(f"<figcaption>{inline_code(section.caption)}</figcaption>")
        parts.append("</figure>")
        if section.csv:
            parts.append(f"<p>Data: <a href='{html.escape(section.csv)}'>{html.escape(section.csv)}</a></p>")
        parts += [f"<p class='missing'>Not drawn / incomplete: {inline_code(message)}</p>"
                  for message in section.messages]
    return "\n".join(parts) + "</body></html>\n"


def log_report(report: Report, out: Path, epoch: int | None = None) -> str:
    """The files `build_report` wrote, as the artifacts of a new `report` run (`harness.report=figures`) in the
    study's experiment, so the MLflow UI shows what `harness figures` drew; returns the run id.

    One run per call, never replaced: a report is what the store held when it was drawn, and an earlier one may
    be the one a result was read from; the newest is the current one (the UI sorts by start time)."""
    tracker = Tracker(report.study, report.tracking_uri)
    config = {"study": report.study, "out": str(Path(out).resolve()), "epoch": epoch, "files": report.files}
    started = None
    try:
        with tracker.run(Kind.REPORT, "figures", {Tag.REPORT: "figures", Tag.OUTPUT_DIR: Path(out).resolve()},
                         config=config) as run:
            started = run.run_id
            for name in report.files:
                run.client.log_artifact(run.run_id, str(Path(out, name)))
            run.log_metrics({"figures": sum(name.endswith(".png") for name in report.files),
                             "missing": len(report.messages)})
    except Exception as error:  # e.g. a copied store whose artifacts live behind an MLflow server that is not up
        if started is not None:  # a half-logged report would look like a report; the files on disk are whole
            tracker.client.delete_run(started)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HarnessError(f"the figures are in {out}, but logging them as a report run failed: {first} "
                           "(--no-log-report writes the files only)") from error
    return run.run_id


def print_messages(report: Report) -> None:
    for message in report.messages:
        print(f"missing: {message}", file=sys.stderr)
