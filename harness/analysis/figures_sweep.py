"""The sweep's figure (Study B, Table 2 as a picture): ASR against S-BERT per trial, the Pareto front drawn.

Used twice: `harness sweep` logs it (with `pareto_front.csv`) to the `sweep` run from Optuna's own
`study.best_trials`, and `harness figures` redraws it from the FINISHED `trial` runs in the MLflow store,
computing the front itself (lower ASR and higher S-BERT are better), so the figure needs no Optuna storage.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.analysis.figures import Section, StudyRuns, pyplot, tag, write_csv
from tracking.schema import Kind, Metric, Tag, tag_filter

REFERENCE_STYLE = {"base": ("#555555", "s"), "sft": ("#d62728", "D")}


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """True for each (asr, sbert) that no other point dominates (no worse in both, better in one)."""
    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(other, point) for other in points) for point in points]


def write_rows(path: Path, rows: list[dict]) -> None:
    if rows:
        write_csv(path, rows)
    else:
        path.write_text("trial,asr,sbert,pareto\n")


def label_groups(rows: list[dict], references: dict, param: str | None) -> list[tuple[tuple, list[str]]]:
    """Trial labels, one per group of points too close to label apart (within 1.5% of the S-BERT span and 2% of
    the ASR axis): their labels join into one, at the group's first point, instead of printing over each other."""
    sberts = [row["sbert"] for row in rows] + [sbert for _, sbert in references.values()]
    span = (max(sberts) - min(sberts)) or 1.0
    groups: list[tuple[tuple, list[str]]] = []
    for row in sorted(rows, key=lambda row: (row["sbert"], row["asr"])):
        label = f"#{row['trial']}" + (f" ({row[param]:.2g})" if param and isinstance(row.get(param), float) else "")
        near = next((group for group in groups if abs(group[0][1] - row["sbert"]) <= 0.015 * span
                     and abs(group[0][0] - row["asr"]) <= 0.02), None)
        if near is None:
            groups.append(((row["asr"], row["sbert"]), [label]))
        else:
            near[1].append(label)
    return groups


def draw_pareto(rows: list[dict], references: dict[str, tuple[float, float]], path: Path, *, title: str,
                param: str | None = None) -> None:
    """Every trial as a dot, the front as larger dots joined by a step line, reference points as markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    others = [row for row in rows if not row["pareto"]]
    front = sorted((row for row in rows if row["pareto"]), key=lambda row: row["asr"])
    ax.scatter([row["asr"] for row in others], [row["sbert"] for row in others], color="0.6", label="trial")
    if front:
        ax.step([row["asr"] for row in front], [row["sbert"] for row in front], where="post", color="#1f77b4", alpha=0.6)
        ax.scatter([row["asr"] for row in front], [row["sbert"] for row in front], color="#1f77b4", s=60,
                   label="Pareto front", zorder=3)
    for (asr, sbert), names in label_groups(rows, references, param):
        ax.annotate(", ".join(names), (asr, sbert), textcoords="offset points", xytext=(5, 3), fontsize=7)
    for name, (asr, sbert) in references.items():
        color, marker = REFERENCE_STYLE.get(name, ("#2ca02c", "^"))
        ax.scatter([asr], [sbert], color=color, marker=marker, s=70, label=f"{name} (reference)", zorder=4)
    ax.set_xlim(-0.03, 1.03)  # ASR is a rate: the whole range keeps sweeps comparable
    ax.set_xlabel("ASR (lower is safer)")
    ax.set_ylabel("S-BERT similarity (higher is more useful)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_sections(runs: StudyRuns, out: Path) -> list[Section]:
    """One section per `sweep` run of the study: its FINISHED trials, the front computed here, its references."""
    asr, sbert = Metric.ASR, Metric.SBERT
    sweeps = runs.tracker.search(tag_filter(kind=Kind.SWEEP))
    sections = []
    for sweep in sweeps:
        study = tag(sweep, Tag.OPTUNA_STUDY) or sweep.info.run_name
        query = runs.query(tag_filter(kind=Kind.TRIAL, optuna_study=study))
        section = Section(f"Sweep {study}: ASR vs S-BERT (Pareto front)")
        trials = [run for run in query.runs if {asr, sbert} <= set(run.data.metrics)]
        if not trials:
            section.messages.append(f"sweep {study}: no FINISHED trial runs with {asr} and {sbert} match `{query.filter}`")
            sections.append(section)
            continue
        params = [key.removeprefix("optuna.") for key in trials[0].data.params if key.startswith("optuna.")]
        mask = pareto_mask([(run.data.metrics[asr], run.data.metrics[sbert]) for run in trials])
        rows = [{"trial": int(tag(run, Tag.TRIAL_NUMBER, "-1")), **{name: float(run.data.params[f"optuna.{name}"])
                 if _number(run.data.params.get(f"optuna.{name}")) else run.data.params.get(f"optuna.{name}") for name in params},
                 "asr": run.data.metrics[asr], "sbert": run.data.metrics[sbert],  # the columns trial_row (sweep.py) has
                 "asr_std": run.data.metrics.get(f"{asr}_std"), "sbert_std": run.data.metrics.get(f"{sbert}_std"),
                 "pareto": front, "run_id": run.info.run_id} for run, front in zip(trials, mask)]
        rows.sort(key=lambda row: row["trial"])
        metrics = sweep.data.metrics
        refs = {name: (metrics[f"reference_{name}_{asr}"], metrics[f"reference_{name}_{sbert}"]) for name in ("base", "sft")
                if f"reference_{name}_{asr}" in metrics and f"reference_{name}_{sbert}" in metrics}
        stem = "sweep_pareto_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", study)
        draw_pareto(rows, refs, out / f"{stem}.png", title=f"sweep {study} (judge {tag(sweep, Tag.JUDGE)})",
                    param=params[0] if len(params) == 1 else None)
        write_rows(out / f"{stem}.csv", rows)
        section.png, section.csv = f"{stem}.png", f"{stem}.csv"
        section.caption = (f"Each dot is a FINISHED trial: mean ASR (judge {tag(sweep, Tag.JUDGE)}) and mean S-BERT over "
                           f"its seeds at its last epoch; the Pareto front (lower ASR, higher S-BERT) is computed from "
                           f"these values; reference points: {', '.join(refs) or 'none logged'}. {query.describe(runs.study)}")
        sections.append(section)
    return sections


def _number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
