"""The `harness` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError, one_line_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()



def print_summary(rows, headline: tuple[str, str] | None = None) -> None:
    """The summary table. With `headline` (judge, reason), its first metric column, ASR, is that judge's ASR
    (`asr_<judge>`), the next its 95% bootstrap interval, and a line above says whose and why; every judge's own
    `asr_<judge>` column stays beside it (intervals only for the headline judge, to keep the table narrow)."""
    metric_names = sorted({name for row in rows for name in row.metrics if not name.endswith(("_ci_low", "_ci_high"))})
    judge = headline[0] if headline else None
    columns = (["ASR", "ASR 95% CI"] if judge else []) + metric_names
    table = Table(title="Summary (first decoding setting, repeat 0)")
    for column in ("method", "format", "seed", "epoch", *columns):
        table.add_column(column, justify="right" if column not in ("method", "format") else "left", overflow="fold")
    for row in rows:
        metrics = dict(row.metrics)
        if f"asr_{judge}" in metrics:
            metrics["ASR"] = metrics[f"asr_{judge}"]
        low, high = metrics.get(f"asr_{judge}_ci_low"), metrics.get(f"asr_{judge}_ci_high")
        interval = f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        values = [interval if name == "ASR 95% CI" else f"{metrics[name]:.3f}" if name in metrics else ""
                  for name in columns]
        table.add_row(row.method, row.format, "" if row.seed is None else str(row.seed), str(row.epoch), *values)
    if headline:
        print(f"ASR = the headline judge's: {headline[1]}")
    # Wide enough for every column even when stdout is a pipe or a CI log (rich assumes 80 columns there).
    Console(width=max(console.width, 40 + 24 * len(columns))).print(table)


@app.command()
@one_line_errors
def run(
    config: Path = typer.Argument(..., help="Experiment YAML, e.g. experiments/quickstart.yaml"),
    new_version: bool = typer.Option(False, "--new-version", help="Start the study afresh as NAME-vN (its data changed)."),
) -> None:
    """Fine-tune and evaluate everything an experiment config describes, recording it all in MLflow.

    Rerunning it trains nothing that finished, evaluates only what the store lacks (a judge, decoding or prompt
    selection added to the YAML) and resumes interrupted work: nothing is lost, duplicated or silently stale.
    """
    from harness.config import load_config
    from harness.study.runner import run_experiment

    report_study(run_experiment(load_config(config), new_version=new_version))


@app.command()
@one_line_errors
def evaluate(config: Path = typer.Argument(..., help="Experiment YAML of a study that has been run")) -> None:
    """Evaluate a study's trained models on what its store lacks, training nothing.

    After adding a judge, a decoding setting or changing the prompt selection in the YAML: only the new
    judge's evaluations are computed from the stored responses, only new decodings are generated. Fine-tunes
    no earlier `harness run` trained are listed and left out. (`harness run` does the same and trains too.)
    """
    from harness.config import load_config
    from harness.study.runner import run_experiment

    result = run_experiment(load_config(config), train=False)
    report_study(result)
    if result.untrained:
        print(f"{len(result.untrained)} fine-tune(s) not trained yet, left out (harness run trains them): "
              f"{', '.join(result.untrained)}")


def report_study(result) -> None:
    """The summary table, what was made and reused, and how to open the runs."""
    print_summary(result.summary, result.headline)
    counts = result.counts
    print(f"generations: {counts.get('generations_new', 0)} made ({counts.get('prompts_generated', 0)} prompts), "
          f"{counts.get('generations_reused', 0)} reused; evaluations: {counts.get('evaluations_new', 0)} made, "
          f"{counts.get('evaluations_reused', 0)} reused")
    if result.unfinished:
        print(f"{result.unfinished} run(s) of this study are not FINISHED (other configs' interrupted attempts); "
              "not shown above")
    # Plain print: rich would wrap a long path, and users copy this line into a shell.
    print(f"Open the runs in the MLflow UI with:\n  {result.ui}")


@app.command()
@one_line_errors
def sweep(
    config: Path = typer.Argument(..., help="Sweep YAML: an experiment config plus a `sweep:` section"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL, e.g. postgresql://user:pw@host/db "
                                "(default: sweep.storage, else SQLite optuna.db beside the MLflow store)"),
    workers: int = typer.Option(None, "--workers", min=1, help="Worker processes on this machine (default sweep.workers)"),
) -> None:
    """Optuna search over fine-tuning settings for low ASR and high S-BERT (Study B, Table 2); resumable, multi-worker.

    Every trial is an MLflow `trial` run under one `sweep` run; the Pareto front is logged there (plot + CSV).
    Run the same command on other machines with the same PostgreSQL --storage to add workers to the study.
    """
    from harness.sweep.search import load_sweep, redact

    cfg, settings = load_sweep(config)
    settings = settings.model_copy(update={key: value for key, value in (("storage", storage), ("workers", workers))
                                           if value is not None})
    if settings.workers > 1:
        from harness.sweep.search import spawn_workers

        code = spawn_workers(cfg, config, settings.workers, settings.storage)
        if code:
            raise typer.Exit(code=code)
        return
    from harness.sweep.search import run_sweep

    result = run_sweep(cfg, settings)
    table = Table(title=f"Sweep {result['study_name']}: trials (* = Pareto front)")
    params = [key for key in (result["rows"][0] if result["rows"] else {}) if key.startswith("train.")]
    for column in ("trial", *params, "asr", "sbert", "pareto"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["trial"]), *[f"{row[name]:.3g}" if isinstance(row[name], float) else str(row[name])
                                           for name in params],
                      f"{row['asr']:.3f}", f"{row['sbert']:.3f}", "*" if row["pareto"] else "")
    for name, values in result["references"].items():
        table.add_row(name, *[""] * len(params), f"{values['asr']:.3f}", f"{values['sbert']:.3f}", "ref")
    Console(width=max(console.width, 100)).print(table)
    counts = ", ".join(f"{name} {count}" for name, count in result["counts"].items() if count)
    print(f"trials: {counts}; study {'complete' if result['done'] else 'not complete (other workers still running)'}")
    print(f"Pareto front: {result['out'] / 'pareto_front.csv'} and pareto_front.png (also on the sweep run)")
    print(f"Open the study with:\n  optuna-dashboard {redact(result['storage'])}")
    print(f"Open the runs in the MLflow UI with:\n  mlflow ui --backend-store-uri {redact(result['tracking_uri'])}")


@app.command()
@one_line_errors
def check(config: Path = typer.Argument(..., help="Experiment (or sweep) YAML to check")) -> None:
    """Validate a config, print it with every default resolved, and check all a run needs without loading weights.

    Besides the config: the model (alias packages, local directory files and chat template, or hub id), every
    dataset file (prepared exactly as a run prepares it: read, columns, counts, checksums), the judges' models
    and templates, the S-BERT model, toxicity and ProMoT inputs. Every problem is one line; nothing is run and
    no MLflow run is created.
    """
    import yaml

    from harness.config import load_config, read_yaml
    from harness.models import UNVERIFIED

    raw = read_yaml(config)
    if isinstance(raw, dict) and "sweep" in raw:  # a `harness sweep` config: its experiment part is checked
        from harness.sweep.search import load_sweep

        cfg, settings = load_sweep(config)
        resolved, kind = {**cfg.resolved(), "sweep": settings.model_dump(mode="json")}, "sweep config"
    else:
        cfg = load_config(config)
        resolved, kind = cfg.resolved(), "experiment config"
    console.print(yaml.safe_dump(resolved, sort_keys=False))
    print("checked:")
    print(f"  ok    config: {config} is a valid {kind}")
    problems: list[str] = []
    for what, step in _check_steps(cfg):
        try:
            for line in step():
                print(f"  {'note' if UNVERIFIED in line else 'ok':<6}{what}: {line}")
        except HarnessError as error:
            problems.append(f"{what}: {error}")
            print(f"  FAIL  {what}: {error}")
    if problems:
        raise HarnessError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    print("all checks passed, notes aside (no weights were loaded and no run was created)")


def _check_steps(cfg):
    """(label, step) pairs for `harness check`; each step returns the lines it verified or raises HarnessError."""
    from collections import Counter

    from harness.models import UNVERIFIED, check_model

    def data_step() -> list[str]:
        from harness.study.runner import prepare_data  # the very function a run prepares its data with

        prepared = prepare_data(cfg)
        d, lines = cfg.data, []
        if d.task == "instructions":
            for name, train in prepared.train.items():
                lines.append(f"{name}: {len(train):,} training rows, {len(prepared.val[name]):,} validation rows "
                             f"(native format)")
        else:
            first = d.formats[0]
            lines.append(f"{d.task}: train {len(prepared.train[first]):,} / val {len(prepared.val[first]):,} / "
                         f"test {len(prepared.test[first]):,} procedures in {len(d.formats)} format(s) "
                         f"({', '.join(d.formats)})")
        by_source = Counter(prompt.source for prompt in prepared.harmful)
        lines.append(f"harmful mix: {len(prepared.harmful):,} prompts ("
                     + ", ".join(f"{name} {count:,}" for name, count in sorted(by_source.items())) + ")")
        if cfg.eval.xstest is not None:
            lines.append(f"xstest: {len(prepared.xstest_safe)} safe, {len(prepared.xstest_unsafe)} unsafe prompts")
        lines.append(f"{len(prepared.checksums)} file(s) read and checksummed (against MANIFEST.json where present)")
        return lines

    def judge_step(judge) -> Callable[[], list[str]]:
        def step() -> list[str]:
            from harness.judges.registry import BASE_URL_ENV, JUDGE_KINDS, judge_template, load_template

            kind = JUDGE_KINDS[judge.name]
            if kind.needs_path:
                from harness.judges.training import JUDGE_FILE

                if not (Path(judge.path) / JUDGE_FILE).is_file():
                    raise HarnessError(f"judge '{judge.name}': {judge.path} is not a judge directory (no {JUDGE_FILE}; "
                                       "make one with `harness judges train`)")
                return [f"judge directory {judge.path}"]
            if not kind.needs_model:
                return [f"{kind.summary} (no model, no template)"]
            if kind.local_only:  # its published prompt ships with the harness (harness/judges/formats.py)
                return [f"published prompt format; model {check_model(judge.model)}"]
            template = judge_template(judge.name, judge.model, judge.template)  # the one a run uses
            load_template(template)
            lines = [f"template {template} has {{instruction}} and {{response}}"]
            if kind.served or judge.base_url:  # a server is not called by `check`
                url = judge.base_url or os.environ.get(BASE_URL_ENV)
                if not url:
                    raise HarnessError(f"judge '{judge.name}' needs a server: set base_url or ${BASE_URL_ENV}")
                return [*lines, f"server {url} (not contacted by check)"]
            return [*lines, f"model {check_model(judge.model)}"]

        return step

    def sbert_step() -> list[str]:
        from harness.evals.metrics import _resolve_sbert

        source = _resolve_sbert(cfg.eval.sbert_model)
        if Path(source).is_dir():
            return [f"{cfg.eval.sbert_model}: local copy {source}"]
        return [f"{cfg.eval.sbert_model}: not a local folder, so it {UNVERIFIED} here; it is loaded from the hub or "
                "the Hugging Face cache before the first run"]

    def toxicity_step() -> list[str]:
        settings = cfg.eval.toxicity
        if settings.backend == "local":
            if not (settings.model_path.is_dir() and (settings.model_path / "config.json").is_file()):
                raise HarnessError(f"eval.toxicity.model_path {settings.model_path} is not a folder holding a "
                                   "text-classification model (config.json)")
            return [f"local classifier folder {settings.model_path}"]
        if settings.backend == "detoxify":  # files only: the weights load (or download) when a run scores
            if settings.model_path is None:
                return [f"Detoxify '{settings.detoxify_model}': weights download on first use (set model_path offline)"]
            if not settings.model_path.is_file():
                raise HarnessError(f"eval.toxicity.model_path {settings.model_path}: no such Detoxify checkpoint file")
            base = settings.base_model_path
            if base is not None and not (base / "config.json").is_file():
                raise HarnessError(f"eval.toxicity.base_model_path {base}: no config.json there (the base model's "
                                   "config and tokenizer files)")
            return [f"Detoxify checkpoint {settings.model_path}"]
        from harness.evals.toxicity import make_scorer

        make_scorer(settings)  # checks the API key; sends nothing
        return [f"perspective API key present ({settings.endpoint})"]

    def promot_step() -> list[str]:
        from harness.models import peek_digest
        from harness.training.promot import SoftPrompt

        path = cfg.train.promot.prompt_path
        prompt = SoftPrompt.load(path, expect_model_digest=peek_digest(cfg.model))
        return [f"stage-1 prompt {path}: {prompt.embeddings.shape[0]} tokens, trained on this model"]

    def gpu_step() -> list[str]:
        """What needs a GPU: 4-bit loading fails here at once; 8-bit AdamW falls back (the run's tag says so); the
        judge served by vLLM (`engine: vllm`) needs CUDA and the vllm package."""
        from harness.judges.vllm_server import vllm_unavailable
        from harness.models import require_four_bit
        from harness.training.sft import resolve_optimizer

        train, lines = cfg.train, []
        if train.quantize_4bit:
            require_four_bit("train.quantize_4bit")
            lines.append("train.quantize_4bit: CUDA and bitsandbytes present (QLoRA, NF4)")
        for judge in cfg.eval.judges:
            if judge.quantize_4bit:
                require_four_bit(f"eval.judges ({judge.name}): quantize_4bit")
            if judge.engine == "vllm":
                if (reason := vllm_unavailable()) is not None:
                    raise HarnessError(f"eval.judges ({judge.name}): engine: vllm cannot run here: {reason}; "
                                       "set engine: hf")
                lines.append(f"eval.judges ({judge.name}): served by vLLM's OpenAI-compatible server")
        if train.optimizer != "adamw_torch":
            lines.append(f"train.optimizer {train.optimizer}: runs as {resolve_optimizer(train.optimizer)[1]}")
        return lines

    steps = [("data", data_step), ("model", lambda: [check_model(cfg.model)]), ("gpu", gpu_step)]
    steps += [(f"judge {i + 1} ({judge.name})", judge_step(judge)) for i, judge in enumerate(cfg.eval.judges)]
    if cfg.eval.task:
        steps.append(("sbert", sbert_step))
    if cfg.eval.toxicity is not None:
        steps.append(("toxicity", toxicity_step))
    if "promot" in cfg.train.methods and cfg.train.promot.prompt_path is not None:
        steps.append(("promot", promot_step))
    return steps


@app.command()
@one_line_errors
def status(config: Path = typer.Argument(..., help="Experiment (or sweep) YAML of the study")) -> None:
    """What the study has done, is running (host, pid, alive?), failed (why) and has left, with a rough time left.

    Reads the store, the Optuna storage of a sweep and the config's data; loads no model and writes no run, so it
    is safe beside a running study (harness/study/status.py says how each kind of unit is counted).
    """
    from harness.config import parse_config, read_yaml
    from harness.study.status import print_status, study_status

    data = read_yaml(config)
    if isinstance(data, dict) and "sweep" in data:
        from harness.sweep.search import parse_sweep

        cfg, settings = parse_sweep(data, str(config))
    else:
        cfg, settings = parse_config(data, str(config)), None
    print_status(study_status(cfg, settings), Console(width=max(console.width, 100)))


@app.command()
@one_line_errors
def datasets() -> None:
    """List the dataset registry: names, kinds, hub ids and local files."""
    from harness.data.registry import describe

    table = Table(title="Datasets")
    rows = describe()
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(value) for value in row.values()])
    console.print(table)


@app.command()
@one_line_errors
def bench(
    task: str = typer.Option("generation", help="generation or training"),
    model: str = typer.Option(
        "tiny-llama", help="llama-3.2-1b, llama-3.1-8b or tiny-llama (random weights), or a model alias, hub id or path"
    ),
    batch: str = typer.Option("16", help="Batch sizes to try, e.g. 128,256 (generation: both paths; training: one)"),
    prompts: int = typer.Option(32, help="Generation: number of prompts"),
    prompt_tokens: str = typer.Option("64", help="Generation, random weights: prompt length, or a range like 32-96"),
    max_new_tokens: int = typer.Option(256, help="Generation: the longest reply"),
    lengths: str = typer.Option(
        "mix", help="mix (realistic reply/example lengths), fixed, or natural (generation: stop at the model's EOS)"
    ),
    decoding: str = typer.Option("greedy", help="greedy, sampled (temperature 0.7, min-p 0.1) or both"),
    seq_len: int = typer.Option(512, help="Training: longest example (and packed row) in tokens"),
    steps: int = typer.Option(6, help="Training: timed optimizer steps (after 2 warm-up steps)"),
    checkpointing: bool = typer.Option(False, help="Training: gradient checkpointing for the plain path"),
    micro_tokens: int = typer.Option(0, help="Training: harness micro-batch size in tokens (0: the whole batch)"),
    compile: bool = typer.Option(False, help="Training: torch.compile the harness path's decoder layers"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32"),
    json_path: Path = typer.Option(None, "--json", help="Where to write the JSON result (default outputs/bench-...)"),
) -> None:
    """Harness fast path against the plain baseline in one process: tokens/s, ratio, peak memory; table and JSON."""
    from harness.bench import bench_generation, bench_training, report

    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        raise HarnessError(f"batch must be comma-separated integers, got {batch!r}") from None
    options = {"device": None if device == "auto" else device, "dtype": None if dtype == "auto" else dtype}
    if task == "generation":
        decodings = ["greedy", "sampled"] if decoding == "both" else [decoding]
        result = bench_generation(
            model, prompts=prompts, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, lengths=lengths,
            batches=batches, decodings=decodings, **options,
        )
    elif task == "training":
        result = bench_training(
            model, batch=batches[0], seq_len=seq_len, lengths=lengths, steps=steps, checkpointing=checkpointing,
            micro_tokens=micro_tokens or None, compile=compile, **options,
        )
    else:
        raise HarnessError(f"task must be generation or training, got {task!r}")
    report(result, json_path or Path("outputs") / f"bench-{task}-{Path(model).name}.json")


@app.command()
@one_line_errors
def figures(
    study: str = typer.Option(..., "--study", help="The study to draw (its experiment YAML's name)"),
    out: Path = typer.Option(Path("figures"), "--out", help="Folder for the PNGs, CSVs, report.md and report.html"),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="Tracking store, e.g. sqlite:///mlruns/mlflow.db or http://host:5000 "
        "(default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)"),
    epoch: int = typer.Option(
        None, "--epoch", help="Epoch for the per-format figures and Table 1 (default: each fine-tune's last)"),
    log_report_run: bool = typer.Option(
        True, "--log-report/--no-log-report", help="Also log the files as a `report` run of the study, for the MLflow "
        "UI (--no-log-report: write the files only, leaving the store as it was)"),
) -> None:
    """The study's figures from its FINISHED runs, with a report: Study A (consistency) or Study B (Fig. 3, 4, Table 1).

    What the store lacks is named on stderr and in the report instead of being drawn empty. The files are also
    logged as the artifacts of a new `report` run in the study's experiment (one per call), for the MLflow UI.
    """
    from harness.analysis.figures import build_report, log_report, print_messages

    report = build_report(study, out, tracking_uri=tracking_uri, epoch=epoch)
    print_messages(report)
    print(f"wrote {len(report.files)} files to {out}: {', '.join(report.files)}")
    print(f"open {out / 'report.html'} (or report.md)")
    if log_report_run:
        print(f"logged them as the artifacts of report run {log_report(report, out, epoch)} (the MLflow UI shows them)")


@app.command()
@one_line_errors
def selfgen(config: Path = typer.Argument(..., help="Study A config with data.task 'instructions'")) -> None:
    """Study A's self-generated data: the base model answers each fine-tuning set's instructions itself.

    Each result is a new dataset version (a JSONL named by its checksum, and a `dataset` run in the study) that
    `data.finetune.selfgen` fine-tunes on; `harness run` makes (or reuses) the same versions.
    """
    from harness.config import load_config
    from harness.errors import HarnessError
    from harness.study.runner import ExperimentRunner
    from harness.data.selfgen import self_generate

    cfg = load_config(config)
    if cfg.data.task != "instructions":
        raise HarnessError(f"{config}: data.task must be 'instructions' for selfgen (got {cfg.data.task!r})")
    runner = ExperimentRunner(cfg)
    runner.prepare()
    for name in cfg.data.finetune.selfgen.datasets or cfg.data.finetune.datasets:
        version = self_generate(runner, name)
        print(f"{version.name}: {len(version.train)} rows, sha256 {version.sha256[:16]}, {version.path} (run {version.run_id})")


report_app = typer.Typer(no_args_is_help=True, help="Analyses written from a study's runs (CSV + markdown, logged to MLflow).")
app.add_typer(report_app, name="report")


@report_app.command("consistency")
@one_line_errors
def report_consistency(
    study: str = typer.Option(..., "--study", help="The study to analyse (its experiment YAML's name)"),
    out: Path = typer.Option(Path("reports"), "--out", help="Folder for the CSVs and consistency.md"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Tracking store (default: $MLFLOW_TRACKING_URI, "
                                     "else ./mlruns/mlflow.db)"),
) -> None:
    """Study A: spread across seeds vs repeats, variance components, bootstrap intervals, paired tests."""
    from harness.analysis.consistency import build_consistency_report

    result = build_consistency_report(study, out, tracking_uri=tracking_uri)
    for message in result["messages"]:
        print(f"note: {message}", file=sys.stderr)
    print(f"wrote {', '.join(result['files'])} to {out} (also logged on a `report` run of study '{study}')")


from harness.cli.judges import app as judges_app  # noqa: E402  (light: heavy imports happen per command)

app.add_typer(judges_app, name="judges", help="Measure judges against human-labelled sets: harness judges validate ...")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Reading a stored generation back is a local copy of one small file: MLflow's bar per copy is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app()


if __name__ == "__main__":
    main()
