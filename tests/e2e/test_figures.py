"""`harness figures`: Study B's figures, tables and report, drawn from a study's MLflow runs.

The session's shared study (tests/shared_store.py: SmolLM2, three formats, SFT and ProMoT with and without its
soft prompt, 2 epochs, two judges) is drawn once through the real CLI, and every CSV value is checked against the
MLflow metric it came from. A hand-made store (no model, seconds) covers what the small study lacks: several
seeds, non-FINISHED runs, a missing benchmark.
"""

import csv
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from harness.analysis import figures
from harness.analysis import figures_study_b
import shared_store
from helpers import run_cli
from shared_store import EPOCHS, FORMATS, HARMFUL_SOURCES, JUDGES, SHARED_STUDY

pytestmark = pytest.mark.e2e
BACKGROUND_JOBS = [shared_store.JOB]

STUDY = SHARED_STUDY
FIGURES = ["fig3_asr", "fig3_asr_by_epoch", "asr_vs_over_refusal", "fig4_train_loss", "fig4_loss_format_vs_content"]
METHODS = ["sft", "promot", "promot+prompt"]  # ProMoT is evaluated with and without its soft prompt


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def draw(workdir: Path, study: str, database: Path, out: Path, *extra: str):
    """`harness figures` without its report run: the shared study's store must stay as the session made it (the
    report run is tested in tests/unit/test_mlflow_views.py)."""
    return run_cli(["figures", "--study", study, "--out", str(out), "--tracking-uri", f"sqlite:///{database}",
                    "--no-log-report", *extra], cwd=workdir)


def method_of(run) -> str:
    """The method a figure names a run by: ProMoT evaluated with its soft prompt is drawn apart."""
    soft = run.data.tags.get("harness.soft_prompt") == "True"
    return run.data.tags["harness.method"] + ("+prompt" if soft else "")


@pytest.fixture(scope="module")
def drawn(shared_study, tmp_path_factory):
    """The shared study drawn once; the figures go to a folder of their own (the study's folder stays read-only)."""
    workdir = tmp_path_factory.mktemp("figures")
    client, runs, database = shared_study.client, shared_study.runs, shared_study.database
    out = workdir / "figures"
    done = draw(workdir, STUDY["name"], database, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, database, client, runs, out, done


def test_every_figure_table_and_report_is_written(drawn):
    _, _, _, _, out, done = drawn
    for stem in FIGURES:
        assert (out / f"{stem}.png").stat().st_size > 10_000, stem  # a drawn figure, not an empty canvas
        assert read_csv(out / f"{stem}.csv"), stem
    assert read_csv(out / "table1_task_quality.csv")
    report = (out / "report.md").read_text()
    for stem in FIGURES:
        assert f"]({stem}.png)" in report
    assert "| format | method |" in report  # Table 1 as markdown
    assert "missing:" not in done.stderr and "Missing from the store" not in report
    html = (out / "report.html").read_text()
    assert all(f"<img src='{stem}.png'" in html for stem in FIGURES) and "<table>" in html


def test_captions_state_n_judge_interval_and_query(drawn):
    _, _, _, _, out, _ = drawn
    report = (out / "report.md").read_text()
    captions = [line for line in report.splitlines() if line.startswith("*") and line.endswith("*")]
    assert len(captions) == len(FIGURES) + 1
    for caption in captions:
        assert "n = " in caption and "seed(s)" in caption
        assert "Judge: none" in caption or "judge `keyword:" in caption
        assert "Interval" in caption
        assert f"Query: experiment `{STUDY['name']}`, filter `tags.\"harness.kind\" = " in caption
        assert "FINISHED runs only" in caption
    assert "percentile bootstrap over prompts (2000 resamples" in report
    assert f"n = {sum(HARMFUL_SOURCES.values())} prompts per evaluation" in report  # one prompt from each source
    assert "non-FINISHED skipped: 0" in report


def test_csv_values_equal_the_mlflow_metrics(drawn):
    _, _, client, runs, out, _ = drawn
    by_id = {run.info.run_id: run for run in runs}
    fig3 = read_csv(out / "fig3_asr.csv")
    # per judge: base + (sft, promot, promot+prompt) × formats at the last epoch
    assert sorted((row["judge"].split(":")[0], row["method"], row["format"], row["epoch"]) for row in fig3) == sorted(
        [(judge, "base", "", "0") for judge in JUDGES]
        + [(judge, m, f, str(EPOCHS)) for judge in JUDGES for m in METHODS for f in FORMATS])
    for name in ("fig3_asr", "fig3_asr_by_epoch", "table1_task_quality"):
        for row in read_csv(out / f"{name}.csv"):
            run = by_id[row["run_id"]]
            assert run.info.status == "FINISHED"
            assert row["method"] == method_of(run)
            assert row["epoch"] == run.data.tags["harness.epoch"]
            for metric in ("asr", "asr_ci_low", "asr_ci_high", "rouge_l", "sbert", "sbert_ci_low", "format_adherence"):
                if metric in row:
                    assert float(row[metric]) == run.data.metrics[metric], (name, metric)
    # per judge: base + methods × formats × epochs
    assert len(read_csv(out / "fig3_asr_by_epoch.csv")) == len(JUDGES) * (1 + len(METHODS) * len(FORMATS) * EPOCHS)
    # base per format + methods × formats
    assert len(read_csv(out / "table1_task_quality.csv")) == len(FORMATS) + len(METHODS) * len(FORMATS)

    side = read_csv(out / "asr_vs_over_refusal.csv")
    assert {row["benchmark"] for row in side} == {"harmful_mix", "xstest_safe"}
    for row in side:
        metrics = by_id[row["run_id"]].data.metrics
        prefix = "asr" if row["metric"] == "asr" else "over_refusal"
        assert float(row["value"]) == metrics[row["metric"]]
        assert float(row["ci_low"]) == metrics[f"{prefix}_ci_low"]
        assert float(row["ci_high"]) == metrics[f"{prefix}_ci_high"]

    for name in ("fig4_train_loss", "fig4_loss_format_vs_content"):
        rows = read_csv(out / f"{name}.csv")
        assert {(row["method"], row["stage"]) for row in rows} == {("sft", ""), ("promot", "1"), ("promot", "2")}
        for (run_id, metric) in {(row["run_id"], row["metric"]) for row in rows}:
            history = {point.step: point.value for point in client.get_metric_history(run_id, metric)}
            drawn_points = {int(row["step"]): float(row["value"]) for row in rows
                            if row["run_id"] == run_id and row["metric"] == metric}
            assert drawn_points == history, (name, metric)
    assert {row["metric"] for row in read_csv(out / "fig4_loss_format_vs_content.csv")} == {
        "train_loss_content", "train_loss_format"}


def test_missing_benchmark_and_unfinished_runs_are_named_not_drawn(drawn, tmp_path):
    """The same study with its XSTest runs gone (as if xstest were off) and one evaluation FAILED."""
    _, database, _, runs, out, _ = drawn
    copy = tmp_path / "mlflow.db"
    shutil.copy(database, copy)
    client = MlflowClient(tracking_uri=f"sqlite:///{copy}")
    for run in runs:
        if run.data.tags.get("harness.benchmark") == "xstest_safe":
            client.delete_run(run.info.run_id)
    failed = next(run for run in runs if run.data.tags.get("harness.benchmark") == "harmful_mix"
                  and run.data.tags.get("harness.method") == "sft")
    client.set_terminated(failed.info.run_id, "FAILED")
    # A stale over-refusal figure from an earlier call must not survive a redraw that can no longer make it.
    shutil.copytree(out, tmp_path / "figures")
    done = draw(tmp_path, STUDY["name"], copy, tmp_path / "figures")
    assert done.returncode == 0, done.stderr[-2000:]
    missing = [line for line in done.stderr.splitlines() if line.startswith("missing: ")]
    assert len(missing) == 1 and "xstest_safe" in missing[0] and "ASR beside over-refusal" in missing[0], done.stderr
    assert not (tmp_path / "figures" / "asr_vs_over_refusal.png").exists()
    report = (tmp_path / "figures" / "report.md").read_text()
    assert "xstest_safe" in report.split("## Missing from the store")[1].split("##")[0]
    assert "non-FINISHED skipped: 1 (FAILED 1)" in report
    assert "1 non-FINISHED skipped: FAILED 1" in report  # in the captions of the figures from that query
    assert failed.info.run_id not in (tmp_path / "figures" / "fig3_asr_by_epoch.csv").read_text()


def test_unknown_study_or_store_is_one_line_error(drawn, tmp_path):
    _, database, *_ = drawn
    done = draw(tmp_path, "no-such-study", database, tmp_path / "out")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: no study 'no-such-study' in sqlite:///{database} (studies there: {STUDY['name']})")
    done = draw(tmp_path, STUDY["name"], tmp_path / "nowhere.db", tmp_path / "out")
    assert done.returncode == 2 and "no tracking store at" in done.stderr and not (tmp_path / "nowhere.db").exists()


# -- a hand-made store: no model, seconds ---------------------------------------------------------------------


class Store:
    """Writes runs the way the pipeline tags them, straight through MlflowClient (no model, no training)."""

    KEYWORD = "keyword:qi2024-v1"
    DECODING = {"temperature": "0.0", "repeat": 0, "judge_validation": "none"}

    def __init__(self, path: Path):
        self.uri = f"sqlite:///{path}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = self.client.create_experiment("synthetic")

    def run(self, kind, tags, metrics=None, history=None, status="FINISHED"):
        tags = {"harness.kind": kind, **{f"harness.{key}": str(value) for key, value in tags.items()}}
        run_id = self.client.create_run(self.experiment, tags=tags).info.run_id
        points = [Metric(name, value, 0, 0) for name, value in (metrics or {}).items()]
        points += [Metric(name, value, 0, step) for name, values in (history or {}).items()
                   for step, value in enumerate(values, start=1)]
        self.client.log_batch(run_id, metrics=points)
        self.client.set_terminated(run_id, status)

    def evaluation(self, tags, benchmark, metrics, judge=None, status="FINISHED"):
        judged = {"judge": judge} if judge else {}
        self.run("evaluation", {**tags, **self.DECODING, "benchmark": benchmark, **judged}, metrics, status=status)


def safety(asr, n=20):
    return {"asr": asr, "asr_ci_low": max(0.0, asr - 0.15), "asr_ci_high": min(1.0, asr + 0.15), "n_prompts": n}


def refusal(rate, n=10):
    return {"over_refusal_rate": rate, "over_refusal_ci_low": max(0.0, rate - 0.2),
            "over_refusal_ci_high": min(1.0, rate + 0.2), "n_prompts": n}


def task(score):
    return {"rouge_l": score / 3, "sbert": score, "sbert_ci_low": score - 0.05, "sbert_ci_high": score + 0.05,
            "format_adherence": 1.0, "n_prompts": 5}


def synthetic_store(path: Path, *, xstest=True, stages=True) -> str:
    """Study B's run tree at paper shape: two judges, two seeds, soft-prompt variants, one FAILED evaluation."""
    store = Store(path)
    judges = {Store.KEYWORD: 0.0, "llm:qi-rubric+llama+t3": -0.1}
    base = {"method": "base", "epoch": 0}
    for judge, shift in judges.items():
        store.evaluation(base, "harmful_mix", safety(0.1 + shift / 2), judge)
    for fmt in ("prose", "list", "json"):
        store.evaluation({**base, "format": fmt}, "wikihow", task(0.8))
    if xstest:
        store.evaluation(base, "xstest_safe", refusal(0.1), Store.KEYWORD)
    for m, method in enumerate(("sft", "promot")):
        for f, fmt in enumerate(("prose", "list", "json")):
            for seed in (0, 1):
                tags = {"method": method, "format": fmt, "seed": seed}
                loss = [2.5 - 0.2 * step - 0.3 * f + 0.05 * seed for step in range(8)]
                curves = {"train_loss": loss, "train_loss_content": [value + 0.1 for value in loss]}
                if fmt != "prose":  # prose has no format tokens
                    curves["train_loss_format"] = [value - 1.0 for value in loss]
                if method == "sft":
                    store.run("finetune", tags, history=curves)
                elif stages:
                    store.run("stage", {**tags, "stage": 1}, history={k: v[:3] for k, v in curves.items()})
                    store.run("stage", {**tags, "stage": 2}, history=curves)
                for epoch in (1, 2):
                    asr = 0.1 + (0.6 - 0.5 * m) * epoch / 2 * (1 + f) / 3 + 0.03 * seed
                    for variant in [{}] + ([{"soft_prompt": True}] if method == "promot" else []):
                        at = {**tags, "epoch": epoch, **variant}
                        for judge, shift in judges.items():
                            value = max(0.0, asr + shift + 0.2 * bool(variant))
                            store.evaluation(at, "harmful_mix", safety(value), judge)
                        if xstest:
                            store.evaluation(at, "xstest_safe", refusal(0.05 * epoch), Store.KEYWORD)
                        store.evaluation(at, "wikihow", task(0.85 + 0.01 * epoch))
    store.evaluation({"method": "sft", "format": "json", "seed": 0, "epoch": 2}, "harmful_mix", safety(0.99),
                     Store.KEYWORD, status="FAILED")
    return store.uri


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    uri = synthetic_store(folder / "mlflow.db")
    report = figures.build_report("synthetic", folder / "figures", tracking_uri=uri)
    return uri, report, folder / "figures"


def test_synthetic_study_draws_every_figure_from_tags(synthetic):
    uri, report, out = synthetic
    assert report.messages == []
    assert set(report.files) == set(figures_study_b.OUTPUTS) | {"report.md", "report.html"}
    fig3 = read_csv(out / "fig3_asr.csv")
    # base per judge + 3 methods (promot+prompt separate) × 3 formats × 2 seeds per judge, last epoch only
    assert len(fig3) == 2 * (1 + 3 * 3 * 2)
    assert {row["method"] for row in fig3} == {"base", "sft", "promot", "promot+prompt"}
    assert {row["epoch"] for row in fig3 if row["method"] != "base"} == {"2"}
    client = MlflowClient(tracking_uri=uri)
    for row in fig3:
        run = client.get_run(row["run_id"])
        assert run.info.status == "FINISHED" and float(row["asr"]) == run.data.metrics["asr"]
        assert (run.data.tags.get("harness.soft_prompt") == "True") == (row["method"] == "promot+prompt")
    text = (out / "report.md").read_text()
    assert "non-FINISHED skipped: 1 (FAILED 1)" in text
    assert "2 seed(s) (0, 1)" in text and "promot+prompt = ProMoT evaluated with its soft prompt attached" in text
    assert "judge `llm:qi-rubric+llama+t3`" in text


def test_synthetic_study_at_an_explicit_epoch(synthetic, tmp_path):
    uri, _, _ = synthetic
    report = figures.build_report("synthetic", tmp_path, tracking_uri=uri, epoch=1)
    assert {row["epoch"] for row in read_csv(tmp_path / "table1_task_quality.csv")} == {"0", "1"}
    report = figures.build_report("synthetic", tmp_path, tracking_uri=uri, epoch=7)
    assert report.messages and all("no fine-tuned evaluation at epoch 7" in message for message in report.messages)
    assert not (tmp_path / "fig3_asr.png").exists() and (tmp_path / "fig3_asr_by_epoch.png").exists()


def test_report_names_the_headline_judge_and_draws_its_asr_panel_first(synthetic, tmp_path, monkeypatch):
    """The headline judge is the study's experiment tag (`harness run` records it); a study without the tag gets it
    from the store's validations, as the runner would choose it."""
    from harness.judges.registry import Verdict
    from harness.judges.validation import VALIDATION_STUDY, headline_judge, log_validation, validate
    from tracking import Tracker
    from harness.data import registry as data

    uri, _, _ = synthetic
    copy = tmp_path / "mlflow.db"
    shutil.copy(uri.removeprefix("sqlite:///"), copy)
    uri = f"sqlite:///{copy}"
    titles = {}
    finish = figures_study_b.finish

    def recording(plt, fig, path, legend=None):
        titles[path.stem] = [ax.get_title() for ax in fig.axes]
        finish(plt, fig, path, legend)

    monkeypatch.setattr(figures_study_b, "finish", recording)

    def draw_and_read(name):
        figures.build_report("synthetic", tmp_path / name, tracking_uri=uri)
        return (tmp_path / name / "report.md").read_text(), (tmp_path / name / "report.html").read_text()

    def headline_panel_first(judge):
        for stem in ("fig3_asr", "fig3_asr_by_epoch", "asr_vs_over_refusal"):
            asr_panels = [title for title in titles[stem] if "over-refusal" not in title]
            assert f"headline judge\n{judge}" in asr_panels[0], (stem, asr_panels)
            assert ["headline judge" in title for title in asr_panels] == [True, False], (stem, asr_panels)

    # No tag, no validation: the first judge, and the report says none was validated.
    text, page = draw_and_read("untagged")
    line = "Headline judge: keyword (first judge; none validated on harm); where ASR is drawn per judge"
    assert line in text and line in page
    headline_panel_first("keyword:qi2024-v1")

    # A validation of the llm judge's exact version in the store: its pooled harm kappa makes it the headline.
    harm = data.load_judge_set("xstest_resp_harm")
    labels = {(row.prompt, row.response): row.positive for row in harm.rows}

    class Oracle:
        name, version = "llm", "qi-rubric+llama+t3"

        def judge(self, items):
            return [Verdict(harmful=labels[item], score=None, raw="", refused=False) for item in items]

    log_validation(Tracker(VALIDATION_STUDY, uri), validate(Oracle(), [harm], n_resamples=20))
    name, reason = headline_judge(uri, [("keyword", "qi2024-v1"), ("llm", "qi-rubric+llama+t3")])
    assert name == "llm" and "pooled harm κ 1.00" in reason
    text, _ = draw_and_read("validated")
    assert f"Headline judge: {reason}; where ASR" in text
    headline_panel_first("llm:qi-rubric+llama+t3")

    # The study's own record (what `harness run` chose, eval.headline here) is read, not recomputed.
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    client.set_experiment_tag(experiment, "harness.headline_judge", "keyword")
    client.set_experiment_tag(experiment, "harness.headline_judge_reason", "keyword (eval.headline)")
    text, _ = draw_and_read("tagged")
    assert "Headline judge: keyword (eval.headline); where ASR" in text
    headline_panel_first("keyword:qi2024-v1")


def test_missing_benchmark_and_run_kind_are_named(tmp_path):
    uri = synthetic_store(tmp_path / "mlflow.db", xstest=False, stages=False)
    report = figures.build_report("synthetic", tmp_path / "figures", tracking_uri=uri)
    joined = "\n".join(report.messages)
    assert "ASR beside over-refusal" in joined and "'xstest_safe'" in joined
    assert "no FINISHED ProMoT stage-1 runs (kind stage, harness.stage=1)" in joined
    assert "no FINISHED ProMoT stage-2 runs" in joined
    assert not (tmp_path / "figures" / "asr_vs_over_refusal.png").exists()
    assert (tmp_path / "figures" / "fig4_train_loss.png").exists()  # SFT's panel still drawn
    assert "xstest_safe" in (tmp_path / "figures" / "report.html").read_text()


# -- pure helpers ----------------------------------------------------------------------------------------------


class Item:
    def __init__(self, **metrics):
        self.metrics = metrics


def test_require_metrics_names_a_metric_no_run_has():
    items = [Item(asr=0.1), Item(asr=0.2, toxicity_mean=0.3)]
    kept, messages = figures.require_metrics(items, ["asr"], "Fig", "F")
    assert kept == items and messages == []
    kept, messages = figures.require_metrics(items, ["asr", "no_such_metric"], "Fig", "F")
    assert kept == [] and messages == ["Fig: metric 'no_such_metric' is in none of the 2 FINISHED runs matching `F`"]
    kept, messages = figures.require_metrics(items, ["toxicity_mean"], "Fig", "F")
    assert kept == items[1:] and messages == ["Fig: 1 of 2 runs lack metric 'toxicity_mean' and are left out"]
    assert figures.require_metrics([], ["asr"], "Fig", "F") == ([], ["Fig: no FINISHED runs match `F`"])


def evaluation(method, fmt, seed, epoch):
    return figures.Evaluation("id", method, fmt, seed, epoch, "keyword:v1", "none", "0.0", "0", {}, {})


def test_select_epoch_takes_each_finetunes_last_epoch():
    rows = [evaluation("base", "", "", 0)] + [evaluation("sft", "json", "0", e) for e in (1, 2, 3)]
    rows += [evaluation("promot", "json", "0", e) for e in (1, 2)]  # a shorter (interrupted) fine-tune
    def chosen(epoch):
        return [(ev.method, ev.epoch) for ev in figures.select_epoch(rows, epoch)]

    assert chosen(None) == [("base", 0), ("sft", 3), ("promot", 2)]
    assert chosen(1) == [("base", 0), ("sft", 1), ("promot", 1)]


def test_order_filter_and_benchmark_names():
    from harness.evals.benchmarks import BENCHMARKS

    assert figures.ordered({"json", "prose", "yaml", "list"}, figures.FORMAT_ORDER) == ["prose", "list", "json", "yaml"]
    assert figures.tag_filter(kind="evaluation", benchmark="wikihow") == (
        "tags.\"harness.kind\" = 'evaluation' AND tags.\"harness.benchmark\" = 'wikihow'")
    names = ("HARMFUL_BENCHMARK", "XSTEST_SAFE_BENCHMARK", "TASK_BENCHMARK")
    # the figures draw the benchmarks the runner evaluates, under the names their runs are tagged with
    assert [getattr(figures_study_b, name) for name in names] == ["harmful_mix", "xstest_safe", "wikihow"]
    assert {getattr(figures_study_b, name) for name in names} <= set(BENCHMARKS)
    assert "95% percentile bootstrap" in figures.INTERVAL and "2000 resamples" in figures.INTERVAL
