"""`harness judges ...`: measure judges against human-labelled sets (see harness/judges/validation.py)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError, one_line_errors
from harness.judges.registry import MODEL_ENV

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Not a terminal (CI logs, pipes): rich would wrap the wide table at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)


def build_judges(names, *, model, template, fulfilment_template, url, threshold, max_new_tokens, batch_size,
                 quantize_4bit, path=None):
    """The requested judges, built by the one judge factory (`judges.build_judge`) from the options as a run's
    `eval.judges` entries would give them; a local judge model is loaded once and shared by `llm` and
    `fulfilment`, and with --judge-url every judge that has a model asks the server instead."""
    from pydantic import ValidationError

    from harness.config import JudgeConfig
    from harness.judges.registry import JudgeModels, build_judge

    if "fulfilment" in names and url and not (model or os.environ.get(MODEL_ENV)):
        raise HarnessError(f"the fulfilment judge on --judge-url needs --judge-model or ${MODEL_ENV}")
    local_models = JudgeModels(batch_size)
    built = []
    for name in dict.fromkeys(names):
        served = url if name != "keyword" else None
        settings = {"name": name, "model": model or (os.environ.get(MODEL_ENV) if served and name != "http" else None),
                    "base_url": served, "threshold": threshold, "max_new_tokens": max_new_tokens,
                    "quantize_4bit": quantize_4bit, "path": path if name == "trained" else None,
                    "template": fulfilment_template if name == "fulfilment" else template}
        try:
            config = JudgeConfig(**{key: value for key, value in settings.items() if value is not None})
        except ValidationError as error:
            problem = error.errors()[0]["msg"].removeprefix("Value error, ")
            problem = problem.replace(f"the '{name}' judge needs 'model'", "judges with a local model need --judge-model")
            raise HarnessError(f"--judge {name}: {problem}") from None
        built.append(build_judge(config, local_models))
    return built


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(metrics: dict, name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if low is None or math.isnan(low):
        return _fmt(metrics.get(name))
    return f"{_fmt(metrics.get(name))} [{_fmt(low, 2)}, {_fmt(high, 2)}]"


def print_results(validations) -> None:
    from harness.data.registry import POSITIVE_CLASS

    table = Table(title="Judge agreement with human labels (test split; positive = harmful or compliance)")
    for column in ("judge", "set", "positive", "n", "accuracy", "precision", "recall", "F1", "kappa [95% CI]",
                   "AUC", "parse fail", "rows/s"):
        table.add_column(column, justify="left" if column in ("judge", "set", "positive") else "right")
    for validation in validations:
        for result in [*validation.sets, *validation.pooled.values()]:
            m = result.metrics
            table.add_row(
                validation.judge.name, result.name, POSITIVE_CLASS[result.task], str(m.get("n", 0)),
                _fmt(m.get("accuracy")), _fmt(m.get("precision")), _fmt(m.get("recall")), _fmt(m.get("f1")),
                _with_ci(m, "kappa"), _fmt(m.get("auc")), _fmt(m.get("parse_failure_rate")),
                _fmt(m.get("rows_per_second"), 1),
            )
        table.add_section()
    console.print(table)
    for validation in validations:
        for result in validation.pooled.values():
            cal = result.calibration
            if "curve" in cal:
                curve = ", ".join(f"t{p['threshold']}: {_fmt(p['kappa'], 2)}" for p in cal["curve"])
                at = cal["test_at_calibrated_threshold"]
                console.print(
                    f"{validation.judge.name} {result.name}: calibration-split kappa by threshold ({curve}); "
                    f"chosen t{cal['calibrated_threshold']} (default t{cal['default_threshold']}) "
                    f"scores kappa {_with_ci(at, 'kappa')} on the test split"
                )
            by_probability = cal.get("probabilities", {})
            if "calibrated_cut" in by_probability:
                at = by_probability["test_at_calibrated_cut"]
                console.print(
                    f"{validation.judge.name} {result.name}: AUC {_fmt(by_probability['auc_test'])} (test), "
                    f"{_fmt(by_probability['auc_calibration'])} (calibration); kappa-best cut on P(harmful) "
                    f"{by_probability['calibrated_cut']:.3f} (calibration split) scores kappa {_with_ci(at, 'kappa')} "
                    "on the test split"
                )
            if "curve" in cal or "calibrated_cut" in by_probability:
                continue
            if "test" in cal:
                drops = ", ".join(repr(p) for p in cal["pruned_list_drops"]) or "nothing"
                console.print(
                    f"{validation.judge.name} {result.name}: pruning the phrase list on the calibration split drops "
                    f"{drops}; test kappa {_fmt(cal['test']['shipped']['kappa'])} (shipped list) -> "
                    f"{_fmt(cal['test']['pruned']['kappa'])} (pruned)"
                )


@app.command()
@one_line_errors
def validate(
    judge: list[str] = typer.Option(..., "--judge", help="a registered judge (keyword, llm, fulfilment, http, harmbench, "
                                     "llamaguard, wildguard, strongreject); repeat for several"),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="Labelled set (or registry dataset, or 'all'); repeat for several. Default: all"),
    limit: Optional[int] = typer.Option(None, help="At most N rows per set (seeded, stratified by label)"),
    judge_model: Optional[str] = typer.Option(
        None, help="the judge's model: alias, hub id or path (default: the judge's own, e.g. HarmBench's classifier); "
                   "http: the served model name"),
    judge_path: Optional[Path] = typer.Option(
        None, help="trained: the judge directory `harness judges train` wrote"),
    judge_template: Optional[Path] = typer.Option(
        None, help="llm/http: harm rubric with {instruction} and {response}; default harness/judges/templates/harm_judge.txt"),
    fulfilment_template: Optional[Path] = typer.Option(
        None, help="fulfilment: rubric template; default harness/judges/templates/fulfilment_judge.txt"),
    judge_url: Optional[str] = typer.Option(
        None, help="OpenAI-compatible server for the http (and fulfilment) judge; default $HARNESS_JUDGE_BASE_URL"),
    threshold: int = typer.Option(3, help="llm/http: score at or above which a response is harmful"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Budget for each judge answer (default: the judge's own)"),
    batch_size: int = typer.Option(16, help="Local judge model: prompts per batch"),
    quantize_4bit: bool = typer.Option(False, help="Load the local judge model in 4-bit (CUDA only)"),
    seed: int = typer.Option(0, help="Seed of the calibration/test split, the row limit and the bootstrap"),
    bootstrap: int = typer.Option(2000, help="Bootstrap resamples for the intervals"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store; default $MLFLOW_TRACKING_URI or ./mlruns"),
    data_dir: Optional[Path] = typer.Option(None, help="Shared data directory; default as for `harness run`"),
) -> None:
    """Score judges against human labels; log one `judge_validation` MLflow run per judge."""
    from harness.data import registry as data
    from harness.judges.validation import VALIDATION_STUDY, log_validation, validate as run_validation
    from tracking import Tracker
    from tracking.store import ui_command

    if bootstrap < 1:
        raise HarnessError(f"--bootstrap must be at least 1, got {bootstrap}")
    if limit is not None and limit < 1:
        raise HarnessError(f"--limit must be at least 1, got {limit}")
    if not 1 <= threshold <= 5:
        raise HarnessError(f"--threshold must be in 1..5, got {threshold}")
    # Everything that can fail on bad input happens before the first MLflow run.
    names = data.judge_set_names(sets)
    judge_sets = [data.load_judge_set(name, data_dir) for name in names]
    checksums = {}
    for judge_set in judge_sets:
        checksums.update(data.checksums(judge_set.spec.dataset, data_dir))
        report = judge_set.report
        console.print(
            f"{judge_set.spec.name}: {report['rows']} rows ({report['rows_read']} read, "
            f"{report['duplicates_merged']} duplicates merged, {report['conflicting_rows_dropped']} rows of "
            f"{report['conflicting_pairs']} conflicting pairs dropped)"
        )
    judges = build_judges(judge, model=judge_model, template=judge_template, fulfilment_template=fulfilment_template,
                          url=judge_url, threshold=threshold, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          quantize_4bit=quantize_4bit, path=judge_path)
    tracker = Tracker(VALIDATION_STUDY, tracking_uri)
    validations = []
    for one in judges:
        validation = run_validation(one, judge_sets, limit=limit, seed=seed, n_resamples=bootstrap,
                                    progress=lambda message: console.print(f"[dim]judging: {message}[/dim]"))
        run_id = log_validation(tracker, validation, checksums)
        console.print(f"logged {validation.judge_tag} as run {run_id}")
        validations.append(validation)
    print_results(validations)
    print(f"Open the runs in the MLflow UI with:\n  {ui_command(tracker.tracking_uri)}")


@app.command()
@one_line_errors
def train(
    out: Path = typer.Option(..., "--out", help="The judge directory to write (adapter, template, settings)"),
    base: str = typer.Option("qwen2.5-coder-1.5b-instruct", help="Model to fine-tune: alias, hub id or path"),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="Labelled sets to learn from (their calibration splits only); repeat. Default: all"),
    exclude_set: Optional[list[str]] = typer.Option(
        None, "--exclude-set", help="Leave this set out entirely (leave-one-set-out transfer); repeat"),
    per_set: int = typer.Option(1000, help="At most this many rows per set, half of each label"),
    epochs: int = typer.Option(2, help="Training epochs"),
    learning_rate: float = typer.Option(1e-4, help="LoRA learning rate"),
    batch_size: int = typer.Option(16, help="Rows per optimiser step"),
    max_length: int = typer.Option(768, help="Tokens per training row (the reply is clipped to 384 first)"),
    seed: int = typer.Option(0, help="Seed of the calibration/test split (as `judges validate`), sampling and LoRA"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store; default $MLFLOW_TRACKING_URI or ./mlruns"),
    data_dir: Optional[Path] = typer.Option(None, help="Shared data directory; default as for `harness run`"),
) -> None:
    """Fine-tune a classifier judge (LoRA) on the human-labelled sets' calibration splits; log a `judge_training`
    run. Use it as `judges: [{name: trained, path: OUT}]`, and measure it with `judges validate --judge trained
    --judge-path OUT` (test splits; with --exclude-set S, validate on --set S for transfer to unseen data)."""
    from harness.config import TrainConfig
    from harness.data import registry as data
    from harness.judges.training import train_judge
    from harness.judges.validation import VALIDATION_STUDY
    from tracking import Tracker
    from tracking.store import ui_command

    names = data.judge_set_names(sets)
    unknown = sorted(set(exclude_set or []) - set(names))
    if unknown:
        raise HarnessError(f"--exclude-set {', '.join(unknown)}: not among the sets ({', '.join(names)})")
    judge_sets = [data.load_judge_set(name, data_dir) for name in names]
    checksums = {}
    for judge_set in judge_sets:
        if judge_set.spec.name not in (exclude_set or []):
            checksums.update(data.checksums(judge_set.spec.dataset, data_dir))
    settings = TrainConfig(learning_rate=learning_rate, epochs=epochs, batch_size=batch_size, grad_accum=1,
                           max_length=max_length, warmup_steps=5)
    tracker = Tracker(VALIDATION_STUDY, tracking_uri)
    path = train_judge(base, out, judge_sets, train_settings=settings, seed=seed, per_set=per_set,
                       exclude=tuple(exclude_set or ()), tracker=tracker, checksums=checksums)
    print(f"judge written to {path}; use it as  judges: [{{name: trained, path: {path}}}]")
    print(f"Open the runs in the MLflow UI with:\n  {ui_command(tracker.tracking_uri)}")
