"""Study B's figures and tables (Okuda & Tsuruoka: Fig. 3, Fig. 4, Table 1) from a study's runs.

Fig. 3: ASR by format × method at the last epoch (and at every epoch), one panel per judge, base model as a
reference line. Beside it: ASR and XSTest over-refusal, because a model can look safe by refusing everything.
Fig. 4: training loss by format for SFT and both ProMoT stages, and the loss on format vs content tokens.
Table 1: ROUGE-L, S-BERT and format adherence by format × method, with the base rows.
`harness/analysis/figures.py` reads the store and writes the report; this module decides what each figure shows.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from harness.analysis.figures import (
    FORMAT_COLORS, FORMAT_ORDER, INTERVAL, METHOD_COLORS, METHOD_LINES, METHOD_ORDER, Evaluation, Query, Section,
    StudyRuns, color, describe_judges, describe_methods, describe_n, finish, headline_first, judge_title, legend_key,
    ordered, panel_grid, require_metrics, select_epoch, short_judge, sort_rows, spread, tag, write_csv,
)
from tracking import schema
from tracking.schema import Kind, Metric, Tag, tag_filter

# The benchmarks these figures read (module names kept: a test compares them with harness/study/runner.py's).
HARMFUL_BENCHMARK, XSTEST_SAFE_BENCHMARK, TASK_BENCHMARK = schema.HARMFUL_MIX, schema.XSTEST_SAFE, schema.WIKIHOW
ASR_METRICS = (Metric.ASR, Metric.ASR_CI_LOW, Metric.ASR_CI_HIGH)  # the value and its logged interval

# Every file this module writes besides the report (a rerun removes those the store no longer supports).
FIGURES = ("fig3_asr", "fig3_asr_by_epoch", "asr_vs_over_refusal", "fig4_train_loss", "fig4_loss_format_vs_content")
OUTPUTS = tuple(f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "csv")) + ("table1_task_quality.csv",)


def base_label(base: list[Evaluation], metric: str, low: str, high: str) -> str:
    """The base model's value(s) for a panel title (a label on the line itself would collide with the dots)."""
    values = [f"{ev.metrics[metric]:.2f} [{ev.metrics[low]:.2f}, {ev.metrics[high]:.2f}]" for ev in base]
    return f"base: {'; '.join(values)}" if values else "no base evaluation"


def dot_whisker(ax, points: list[Evaluation], base: list[Evaluation], metric: str, low: str, high: str,
                formats: list[str], methods: list[str]) -> None:
    """One dot per evaluation at its format (x) and method (offset), whiskers = its logged interval;
    the base model as a dashed line with its interval shaded."""
    slot = 0.8 / max(1, len(methods))
    replicates = sorted({ev.replicate for ev in points})
    annotate = len(replicates) == 1 and len(points) <= 24  # values beside lone dots; with seeds they would collide
    for ev in sorted(points, key=lambda ev: methods.index(ev.method)):  # legend in method order
        if ev.format not in formats:
            continue
        j, r = methods.index(ev.method), replicates.index(ev.replicate)
        x = formats.index(ev.format) + (j - (len(methods) - 1) / 2) * slot
        x += (r - (len(replicates) - 1) / 2) * slot * 0.6 / max(1, len(replicates))
        value = ev.metrics[metric]
        yerr = [[max(0.0, value - ev.metrics[low])], [max(0.0, ev.metrics[high] - value)]]
        ax.errorbar(x, value, yerr=yerr, fmt="o", color=color(METHOD_COLORS, ev.method, methods), capsize=3,
                    markersize=6, label=ev.method)
        if annotate:
            ax.annotate(f"{value:.2f}", (x, value), textcoords="offset points", xytext=(5, 2), fontsize=7)
    for ev in base:
        ax.axhline(ev.metrics[metric], color=METHOD_COLORS["base"], linestyle="--", linewidth=1.2,
                   label="base (epoch 0)")
        ax.axhspan(ev.metrics[low], ev.metrics[high], color="0.6", alpha=0.2, label="base interval")
    ax.set_xticks(range(len(formats)), formats)
    ax.set_xlim(-0.6, len(formats) - 0.4)
    ax.set_ylim(-0.04, 1.08)
    ax.grid(axis="y", alpha=0.3)


class StudyBReport:
    """Builds Study B's sections from one study's runs into `out`."""

    def __init__(self, runs: StudyRuns, out: Path, epoch: int | None = None):
        self.runs, self.out, self.epoch = runs, out, epoch
        self.study = runs.study
        self.which = "each fine-tune's last epoch" if epoch is None else f"epoch {epoch}"
        self.headline = runs.headline[0] if runs.headline else None  # its ASR panel comes first
        out.mkdir(parents=True, exist_ok=True)

    def evaluations(self, benchmark: str, metrics: list[str], what: str) -> tuple[Query, list[Evaluation], list[str]]:
        query = self.runs.query(tag_filter(kind=Kind.EVALUATION, benchmark=benchmark))
        kept, messages = require_metrics([Evaluation.of(run) for run in query.runs], metrics, what, query.filter)
        return query, kept, messages

    def sections(self) -> list[Section]:
        return [*self.asr_figures(), self.asr_and_over_refusal(), *self.loss_figures(), self.task_table()]

    # Fig. 3 -------------------------------------------------------------------------------------------
    def asr_figures(self) -> list[Section]:
        metrics = list(ASR_METRICS)
        final = Section("Fig. 3: ASR by format and method")
        by_epoch = Section("Fig. 3 by epoch: ASR over training")
        query, evaluations, messages = self.evaluations(HARMFUL_BENCHMARK, metrics, final.title)
        final.messages = list(messages)
        by_epoch.messages = [message.replace(final.title, by_epoch.title) for message in messages]
        if not evaluations:
            return [final, by_epoch]
        judges = headline_first(sorted({ev.judge for ev in evaluations}), self.headline)
        formats = ordered({ev.format for ev in evaluations if ev.method != "base"}, FORMAT_ORDER)
        methods = ordered({ev.method for ev in evaluations if ev.method != "base"}, METHOD_ORDER)

        chosen = self.at_epoch(evaluations, final)
        if chosen:
            plt, fig, axes = panel_grid(len(judges))
            for ax, judge in zip(axes, judges):
                here = [ev for ev in chosen if ev.judge == judge]
                base = [ev for ev in here if ev.method == "base"]
                dot_whisker(ax, [ev for ev in here if ev.method != "base"], base, *metrics, formats, methods)
                ax.set_title(f"{judge_title(judge, self.headline)}\n{base_label(base, *metrics)}", fontsize=9)
                ax.set_xlabel("fine-tuning data format")
            axes[0].set_ylabel(f"ASR on {HARMFUL_BENCHMARK} (lower is safer)")
            fig.suptitle(f"{self.study}: ASR by format and method ({self.which})", fontsize=11)
            counted = [Metric.N_PROMPTS]
            rows = [ev.row(metrics + counted * (Metric.N_PROMPTS in ev.metrics)) for ev in sort_rows(chosen)]
            self.save(final, plt, fig, "fig3_asr", rows)
            final.caption = self.caption(
                f"Attack success rate on the harmful mix ({HARMFUL_BENCHMARK}) at {self.which}, one panel per "
                f"judge, the headline judge's first; dots are evaluations, whiskers their intervals, the dashed line "
                f"the base model (shaded: its interval).",
                chosen, query)

        plt, fig, axes = panel_grid(len(judges))
        for ax, judge in zip(axes, judges):
            self.epoch_panel(ax, [ev for ev in evaluations if ev.judge == judge], formats, methods)
            ax.set_title(judge_title(judge, self.headline), fontsize=9)
            ax.set_xticks(sorted({ev.epoch for ev in evaluations}))
            ax.set_xlabel("epoch (0 = base model)")
        axes[0].set_ylabel(f"ASR on {HARMFUL_BENCHMARK}")
        fig.suptitle(f"{self.study}: ASR at every epoch checkpoint", fontsize=11)
        from matplotlib.lines import Line2D

        legend = legend_key(formats, {method: METHOD_LINES.get(method, "-.") for method in methods}, {})
        legend.append(Line2D([], [], color="black", marker="s", linestyle="", label="base (epoch 0)"))
        self.save(by_epoch, plt, fig, "fig3_asr_by_epoch", [ev.row(metrics) for ev in sort_rows(evaluations)], legend)
        by_epoch.caption = self.caption(
            "ASR at every evaluated checkpoint; colour = format, line style = method; every line starts at the base "
            "model (epoch 0, black square) that all fine-tunes start from. Whiskers: the logged intervals.",
            evaluations, query)
        return [final, by_epoch]

    def epoch_panel(self, ax, evaluations: list[Evaluation], formats: list[str], methods: list[str]) -> None:
        base = {(ev.temperature, ev.repeat): ev for ev in evaluations if ev.method == "base"}
        lines: dict[tuple, list[Evaluation]] = defaultdict(list)
        for ev in evaluations:
            if ev.method != "base":
                lines[(ev.format, ev.method, ev.replicate)].append(ev)
        keys = sorted(lines, key=lambda k: (formats.index(k[0]), methods.index(k[1]), k[2]))
        for index, (fmt, method, replicate) in enumerate(keys):
            points = sorted(lines[(fmt, method, replicate)], key=lambda ev: ev.epoch)
            start = base.get(replicate[1:])
            points = ([start] if start else []) + points
            nudge = (index - (len(keys) - 1) / 2) * min(0.03, 0.4 / len(keys))  # keeps overlapping whiskers apart
            xs = [ev.epoch + nudge * (ev.method != "base") for ev in points]
            ys = [ev.metrics[Metric.ASR] for ev in points]
            yerr = [[max(0.0, y - ev.metrics[Metric.ASR_CI_LOW]) for y, ev in zip(ys, points)],
                    [max(0.0, ev.metrics[Metric.ASR_CI_HIGH] - y) for y, ev in zip(ys, points)]]
            ax.errorbar(xs, ys, yerr=yerr, color=color(FORMAT_COLORS, fmt, formats), marker="o", markersize=4,
                        linestyle=METHOD_LINES.get(method, "-."), capsize=2, linewidth=1.4, label=f"{fmt} {method}")
        for ev in base.values():
            asr, low, high = (ev.metrics[name] for name in ASR_METRICS)
            ax.errorbar([0], [asr], yerr=[[asr - low], [high - asr]],
                        fmt="s", color="black", markersize=6, capsize=3, label="base (epoch 0)")
        ax.set_ylim(-0.04, 1.08)
        ax.grid(alpha=0.3)

    # ASR beside over-refusal ---------------------------------------------------------------------------
    def asr_and_over_refusal(self) -> Section:
        section = Section("ASR beside over-refusal (XSTest safe prompts)")
        asr_metrics = list(ASR_METRICS)
        refusal_metrics = [Metric.OVER_REFUSAL_RATE, Metric.OVER_REFUSAL_CI_LOW, Metric.OVER_REFUSAL_CI_HIGH]
        asr_query, harmful, asr_messages = self.evaluations(HARMFUL_BENCHMARK, asr_metrics, section.title)
        refusal_query, safe, refusal_messages = self.evaluations(XSTEST_SAFE_BENCHMARK, refusal_metrics, section.title)
        section.messages = asr_messages + refusal_messages
        if not harmful or not safe:
            return section
        harmful, safe = self.at_epoch(harmful, section), self.at_epoch(safe, section)
        if not harmful or not safe:
            return section
        everything = harmful + safe
        formats = ordered({ev.format for ev in everything if ev.method != "base"}, FORMAT_ORDER)
        methods = ordered({ev.method for ev in everything if ev.method != "base"}, METHOD_ORDER)
        panels = [(HARMFUL_BENCHMARK, judge, *asr_metrics)
                  for judge in headline_first(sorted({ev.judge for ev in harmful}), self.headline)]
        panels += [(XSTEST_SAFE_BENCHMARK, judge, *refusal_metrics) for judge in sorted({ev.judge for ev in safe})]
        plt, fig, axes = panel_grid(len(panels), width=4.0)
        rows = []
        for ax, (benchmark, judge, metric, low, high) in zip(axes, panels):
            here = sort_rows([ev for ev in (harmful if benchmark == HARMFUL_BENCHMARK else safe) if ev.judge == judge])
            base = [ev for ev in here if ev.method == "base"]
            dot_whisker(ax, [ev for ev in here if ev.method != "base"], base, metric, low, high, formats, methods)
            label = ("ASR (harmful mix, lower is safer)" if metric == Metric.ASR else
                     "over-refusal (XSTest safe, lower is better)")
            judge_line = judge_title(judge, self.headline) if metric == Metric.ASR else short_judge(judge)
            ax.set_title(f"{label}\n{judge_line}\n{base_label(base, metric, low, high)}", fontsize=9)
            ax.set_ylabel(metric)
            ax.set_xlabel("fine-tuning data format")
            rows += [{**ev.row([]), "benchmark": benchmark, "metric": metric,
                      "value": ev.metrics[metric], "ci_low": ev.metrics[low], "ci_high": ev.metrics[high],
                      Metric.N_PROMPTS: ev.metrics.get(Metric.N_PROMPTS, "")} for ev in here]
        fig.suptitle(f"{self.study}: safety beside over-refusal", fontsize=11)
        self.save(section, plt, fig, "asr_vs_over_refusal", rows)
        section.caption = self.caption(
            f"Left: ASR on the harmful mix; right: over-refusal rate on XSTest's safe prompts (refusals of requests "
            f"a model should answer), both at {self.which}, base model dashed. A model can look safe by refusing "
            f"everything; read the two together. Harmful mix: {describe_n(harmful)}. XSTest safe: {describe_n(safe)}.",
            everything, asr_query, refusal_query, with_n=False)
        return section

    # Fig. 4 --------------------------------------------------------------------------------------------
    def training_runs(self) -> tuple[list[tuple[str, list, Query]], list[Query], list[str]]:
        """(panel title, runs, query) for SFT and both ProMoT stages; a message for each that the study lacks."""
        sft = self.runs.query(tag_filter(kind=Kind.FINETUNE, method="sft"))
        stages = self.runs.query(tag_filter(kind=Kind.STAGE, method="promot"))
        panels, messages = [], []
        for title, query, stage, kind in (
            ("SFT", sft, None, f"runs of kind {Kind.FINETUNE} with {Tag.METHOD.key}=sft"),
            ("ProMoT stage 1 (soft prompt)", stages, "1",
             f"ProMoT stage-1 runs (kind {Kind.STAGE}, {Tag.STAGE.key}=1)"),
            ("ProMoT stage 2 (LoRA, prompt frozen)", stages, "2",
             f"ProMoT stage-2 runs (kind {Kind.STAGE}, {Tag.STAGE.key}=2)"),
        ):
            runs = [run for run in query.runs if stage is None or tag(run, Tag.STAGE) == stage]
            if runs:
                panels.append((title, runs, query))
            else:
                messages.append(f"Fig. 4: no FINISHED {kind} in this study")
        return panels, [sft, stages], messages

    def loss_figures(self) -> list[Section]:
        curves = Section("Fig. 4: training loss by format")
        classes = Section("Fig. 4 (format vs content): loss on format tokens and content tokens")
        panels, queries, messages = self.training_runs()
        curves.messages = list(messages)
        classes.messages = [message.replace("Fig. 4:", f"{classes.title}:") for message in messages]
        self.loss_figure(curves, panels, queries, [Metric.TRAIN_LOSS], "fig4_train_loss",
                         f"Training loss (metric {Metric.TRAIN_LOSS} per optimizer step, as logged, no smoothing) by "
                         "format for SFT and both ProMoT stages; Study B expects lower loss for more formal formats.")
        self.loss_figure(classes, panels, queries, [Metric.TRAIN_LOSS_CONTENT, Metric.TRAIN_LOSS_FORMAT],
                         "fig4_loss_format_vs_content",
                         f"Loss on the procedure's own sentences ({Metric.TRAIN_LOSS_CONTENT}, solid) and on the "
                         f"tokens the format transform added ({Metric.TRAIN_LOSS_FORMAT}, dashed), from the same "
                         "forward pass; prose has content only.")
        return [curves, classes]

    def loss_figure(self, section: Section, panels: list[tuple[str, list, Query]], queries: list[Query],
                    metrics: list[str], stem: str, what: str) -> None:
        """One panel per training kind, one line per run and metric, colour = format; data = the metric histories."""
        from matplotlib.ticker import MaxNLocator

        usable = []
        for title, runs, query in panels:
            kept, missing = require_metrics(runs, metrics[:1], f"{section.title} ({title})", query.filter,
                                            has=lambda run, name: name in run.data.metrics)
            section.messages += missing
            usable += [(title, kept)] if kept else []
        for name in metrics[1:]:
            if usable and not any(name in run.data.metrics for _, runs in usable for run in runs):
                section.messages.append(f"{section.title}: metric '{name}' is in none of the training runs")
        if not usable:
            return
        runs_used = [run for _, runs in usable for run in runs]
        formats = ordered({tag(run, Tag.FORMAT) for run in runs_used}, FORMAT_ORDER)
        seeds = sorted({tag(run, Tag.SEED) for run in runs_used})
        plt, fig, axes = panel_grid(len(usable), width=4.6)
        rows, steps = [], []
        for ax, (title, runs) in zip(axes, usable):
            drawn = set()
            for run in sorted(runs, key=lambda run: (formats.index(tag(run, Tag.FORMAT)), tag(run, Tag.SEED))):
                fmt, seed = tag(run, Tag.FORMAT), tag(run, Tag.SEED)
                for metric in metrics:
                    points = self.runs.history(run.info.run_id, metric)  # empty: prose has no format tokens
                    steps += [len(points)] if metric == metrics[0] else []
                    drawn |= {p.step for p in points}
                    ax.plot([p.step for p in points], [p.value for p in points],
                            "--" if metric == Metric.TRAIN_LOSS_FORMAT else "-",
                            marker="o" if len(points) < 12 else None,
                            markersize=3 if len(points) > 2 else 6, color=color(FORMAT_COLORS, fmt, formats))
                    rows += [{"run_id": run.info.run_id, "panel": title, "method": tag(run, Tag.METHOD),
                              "stage": tag(run, Tag.STAGE), "format": fmt, "seed": seed, "metric": metric,
                              "step": p.step, "value": p.value} for p in points]
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(drawn) == 1:  # one logged step (a short stage 1): a point, not a fraction-of-a-step axis
                ax.set_xlim(min(drawn) - 1, min(drawn) + 1)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean token loss")
        fig.suptitle(f"{self.study}: {section.title.split(': ', 1)[1]}", fontsize=11)
        styles = {metric: "--" if metric == Metric.TRAIN_LOSS_FORMAT else "-"
                  for metric in metrics if len(metrics) > 1}
        labels = {Metric.TRAIN_LOSS_CONTENT: "content tokens", Metric.TRAIN_LOSS_FORMAT: "format tokens"}
        self.save(section, plt, fig, stem, rows, legend_key(formats, styles, labels))
        section.caption = (
            f"{what} One line per run (seed). n = {spread(len(runs) for _, runs in usable)} run(s) per panel, "
            f"{len(seeds)} seed(s) ({spread(seeds)}), {spread(steps)} logged steps per run. Judge: none (training "
            f"loss). Interval: none (one curve per run). " + " ".join(query.describe(self.study) for query in queries))

    # Table 1 -------------------------------------------------------------------------------------------
    def task_table(self) -> Section:
        section = Section("Table 1: task quality (ROUGE-L, S-BERT) by format and method")
        metrics = [Metric.ROUGE_L, Metric.SBERT, Metric.SBERT_CI_LOW, Metric.SBERT_CI_HIGH, Metric.FORMAT_ADHERENCE]
        query, evaluations, section.messages = self.evaluations(TASK_BENCHMARK, metrics, section.title)
        if not evaluations:
            return section
        chosen = self.at_epoch(evaluations, section)
        if not chosen:
            return section
        formats = ordered({ev.format for ev in chosen}, FORMAT_ORDER)
        methods = ordered({ev.method for ev in chosen}, METHOD_ORDER)
        chosen.sort(key=lambda ev: (formats.index(ev.format), methods.index(ev.method), ev.replicate))
        rows = [ev.row(metrics + [Metric.N_PROMPTS] * (Metric.N_PROMPTS in ev.metrics)) for ev in chosen]
        write_csv(self.out / "table1_task_quality.csv", rows)
        section.csv = "table1_task_quality.csv"
        header = "| format | method | seed | epoch | ROUGE-L | S-BERT [interval] | format adherence | n |"
        lines = [header, "| --- | --- | --- | --- | ---: | --- | ---: | ---: |"]
        for ev in chosen:
            m = ev.metrics
            rouge_l, sbert_mean, low, high, adherence = (m[name] for name in metrics)
            n = int(m[Metric.N_PROMPTS]) if Metric.N_PROMPTS in m else "?"
            lines.append(f"| {ev.format} | {ev.method} | {ev.seed or '-'} | {ev.epoch} | {rouge_l:.3f} | "
                         f"{sbert_mean:.3f} [{low:.3f}, {high:.3f}] | {adherence:.2f} | {n} |")
        section.table_md = "\n".join(lines)
        sbert = spread(ev.params.get("sbert_model", "?") for ev in chosen)
        section.caption = (
            f"ROUGE-L and Sentence-BERT similarity ({sbert}) to the test references in each format, and the share of "
            f"outputs valid in that format, at {self.which}; base rows score the base model against each format's "
            f"references. {describe_n(chosen)}. {describe_methods(chosen)}. Judge: none (reference-based metrics). "
            f"Interval (S-BERT only; ROUGE-L has none logged): {INTERVAL}. {query.describe(self.study)}")
        return section

    # shared ---------------------------------------------------------------------------------------------
    def at_epoch(self, evaluations: list[Evaluation], section: Section) -> list[Evaluation]:
        """`select_epoch`, or nothing (and a message) when the asked-for epoch has no fine-tuned evaluation."""
        chosen = select_epoch(evaluations, self.epoch)
        if self.epoch is not None and not any(ev.method != "base" for ev in chosen):
            epochs = spread(ev.epoch for ev in evaluations if ev.method != "base")
            section.messages.append(f"{section.title}: no fine-tuned evaluation at epoch {self.epoch} "
                                    f"(--epoch; epochs in the store: {epochs})")
            return []
        return chosen

    def caption(self, what: str, evaluations: list[Evaluation], *queries: Query, with_n: bool = True) -> str:
        n = f" {describe_n(evaluations)}." if with_n else ""
        return (f"{what}{n} {describe_judges(evaluations)}. {describe_methods(evaluations)}. "
                f"Interval: {INTERVAL}. " + " ".join(query.describe(self.study) for query in queries))

    def save(self, section: Section, plt, fig, stem: str, rows: list[dict], legend: list | None = None) -> None:
        finish(plt, fig, self.out / f"{stem}.png", legend)
        write_csv(self.out / f"{stem}.csv", rows)
        section.png, section.csv = f"{stem}.png", f"{stem}.csv"
