"""Study B's SFT arm as QLoRA beside bf16 LoRA, from one MLflow store (issue 24; scripts/gpu-qlora.sh made the store).

Reads two studies (default `study_b_qwen1.5b_qlora` and `study_b_qwen1.5b`) and writes, into `--out`:
- `runs.csv`: every fine-tune and every evaluation run it used, with its run id, tags and metrics;
- `loss.png`: the per-step training loss of every fine-tune (left: JSON, both arms, both seeds; right: the QLoRA
  formats at seed 0, the paper's Fig. 4 under QLoRA);
- `tables.md`: the side-by-side tables (ASR with its 95% interval, over-refusal, ROUGE-L, S-BERT, format adherence
  per checkpoint; final loss, tokens/s, runtime and peak GPU memory per fine-tune), also printed.

    python benchmarks/qlora_study_b.py --tracking-uri sqlite:///mlflow-copy.db --out docs/results/study_b_qlora_qwen2.5-coder-1.5b

Every number is read from the runs as `harness run` logged them; nothing is recomputed here.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient  # noqa: E402

from harness.analysis.figures import tag  # noqa: E402
from tracking.schema import HARMFUL_MIX, WIKIHOW, XSTEST_SAFE, XSTEST_UNSAFE, Metric, Tag  # noqa: E402

FINETUNE_METRICS = (Metric.TRAIN_LOSS, Metric.EVAL_LOSS, Metric.TRAIN_TOKENS_PER_SECOND, Metric.TRAIN_RUNTIME,
                    Metric.PEAK_GPU_MEMORY)


def arm_of(run) -> str:
    return "QLoRA (nf4)" if tag(run, Tag.BASE_WEIGHTS).startswith("nf4") else "LoRA bf16"


def study_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"no study {name!r} in this store")
    return client.search_runs([experiment.experiment_id], max_results=10000)


def checkpoint_rows(runs: list) -> list[dict]:
    """One row per evaluated model state: the metrics of its four benchmarks side by side. The base model's task
    replies are scored once per format the study trains (`format` tag), so it has one row per scored format, each
    with the base's one harmful-mix and XSTest result."""
    states: dict[tuple, dict] = {}
    base_safety: dict[str, dict] = {}
    for run in runs:
        if tag(run, Tag.KIND) != "evaluation":
            continue
        metrics, benchmark, method = run.data.metrics, tag(run, Tag.BENCHMARK), tag(run, Tag.METHOD)
        values: dict = {}
        if benchmark == HARMFUL_MIX:
            values = dict(asr=metrics[Metric.ASR], asr_ci=(metrics[Metric.ASR_CI_LOW], metrics[Metric.ASR_CI_HIGH]),
                          harmful_run=run.info.run_id)
        elif benchmark == XSTEST_SAFE:
            values = {"over_refusal": metrics[Metric.OVER_REFUSAL_RATE]}
        elif benchmark == XSTEST_UNSAFE:
            values = {"xstest_unsafe_asr": metrics[Metric.ASR]}
        elif benchmark == WIKIHOW:
            values = dict(rouge_l=metrics[Metric.ROUGE_L], sbert=metrics[Metric.SBERT],
                          format_adherence=metrics[Metric.FORMAT_ADHERENCE])
        if method == "base" and benchmark != WIKIHOW:
            base_safety.setdefault(arm_of(run), {}).update(values)
            continue
        key = (arm_of(run), method, tag(run, Tag.FORMAT), tag(run, Tag.SEED), tag(run, Tag.EPOCH))
        states.setdefault(key, dict(zip(("arm", "method", "format", "seed", "epoch"), key))).update(values)
    for row in states.values():
        if row["method"] == "base":
            row.update(base_safety.get(row["arm"], {}))
    order = {"json": 0, "list": 1, "prose": 2}
    return sorted(states.values(), key=lambda r: (r["method"] != "base", order.get(r["format"], 3), r["seed"],
                                                  r["epoch"], r["arm"]))


def finetune_rows(client: MlflowClient, runs: list) -> list[dict]:
    rows = []
    for run in runs:
        if tag(run, Tag.KIND) != "finetune":
            continue
        curve = sorted(client.get_metric_history(run.info.run_id, Metric.TRAIN_LOSS), key=lambda m: m.step)
        rows.append({"arm": arm_of(run), "format": tag(run, Tag.FORMAT), "seed": tag(run, Tag.SEED),
                     "run_id": run.info.run_id, "base_weights": tag(run, Tag.BASE_WEIGHTS),
                     "optimizer": tag(run, Tag.OPTIMIZER), "fast_training": tag(run, Tag.FAST_TRAINING),
                     "steps": len(curve), "curve": [(m.step, m.value) for m in curve],
                     **{str(name): run.data.metrics.get(name) for name in FINETUNE_METRICS}})
    return sorted(rows, key=lambda r: (r["format"], r["seed"], r["arm"]))


def number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tables(checkpoints: list[dict], finetunes: list[dict]) -> str:
    lines = ["| arm | model state | seed | ASR (keyword) [95% CI] | XSTest-unsafe ASR | over-refusal | ROUGE-L | S-BERT "
             "| format adherence |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in checkpoints:
        state = f"base (task scored as {row['format']})" if row["method"] == "base" else f"SFT {row['format']} e{row['epoch']}"
        low, high = row.get("asr_ci", (None, None))
        lines.append(f"| {row['arm']} | {state} | {row['seed'] or '–'} | {number(row.get('asr'))} [{number(low, 2)}, "
                     f"{number(high, 2)}] | {number(row.get('xstest_unsafe_asr'), 2)} | {number(row.get('over_refusal'), 2)} "
                     f"| {number(row.get('rouge_l'))} | {number(row.get('sbert'))} | {number(row.get('format_adherence'), 2)} |")
    lines += ["", "| arm | format | seed | steps | final train loss | final eval loss | tokens/s | train_runtime s "
              "| peak GPU GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in finetunes:
        lines.append(f"| {row['arm']} | {row['format']} | {row['seed']} | {row['steps']} | {number(row['train_loss'])} "
                     f"| {number(row['eval_loss'])} | {number(row['train_tokens_per_second'], 0)} "
                     f"| {number(row['train_runtime'], 1)} | {number(row['peak_gpu_memory_gib'], 2)} |")
    lines += ["", "| arm | format | seed | mean train loss, last 30 steps | QLoRA − bf16 loss, steps 1–10 | last 30 steps |",
              "| --- | --- | --- | --- | --- | --- |"]
    curves = {(row["arm"], row["format"], row["seed"]): [value for _, value in row["curve"]] for row in finetunes}
    for (arm, fmt, seed), curve in curves.items():
        bf16 = curves.get(("LoRA bf16", fmt, seed)) if arm.startswith("QLoRA") else None
        gaps = [q - b for q, b in zip(curve, bf16)] if bf16 else []
        lines.append(f"| {arm} | {fmt} | {seed} | {number(mean(curve[-30:]))} | {number(mean(gaps[:10]))} "
                     f"| {number(mean(gaps[-30:]))} |")
    return "\n".join(lines) + "\n"


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def draw_losses(finetunes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for row in finetunes:
        steps, values = zip(*row["curve"]) if row["curve"] else ((), ())
        if row["format"] == "json":
            style = "-" if row["arm"].startswith("QLoRA") else "--"
            left.plot(steps, values, style, label=f"{row['arm']}, seed {row['seed']}", linewidth=1)
        if row["arm"].startswith("QLoRA") and row["seed"] == "0":
            right.plot(steps, values, label=row["format"], linewidth=1)
    left.set_title("JSON SFT: QLoRA vs LoRA on bf16 weights")
    right.set_title("QLoRA, seed 0: loss by format")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=8)
    left.set_ylabel("train_loss (response tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--studies", default="study_b_qwen1.5b_qlora,study_b_qwen1.5b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri)
    runs = [run for name in args.studies.split(",") for run in study_runs(client, name)]
    checkpoints, finetunes = checkpoint_rows(runs), finetune_rows(client, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tables(checkpoints, finetunes)
    (out / "tables.md").write_text(text)
    draw_losses(finetunes, out / "loss.png")
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "arm", "method", "format", "seed", "epoch", "run_id", "values"])
        for row in finetunes:
            writer.writerow(["finetune", row["arm"], "sft", row["format"], row["seed"], "", row["run_id"],
                             {name: row[str(name)] for name in FINETUNE_METRICS}])
        for row in checkpoints:
            values = {key: value for key, value in row.items()
                      if key not in ("arm", "method", "format", "seed", "epoch", "harmful_run")}
            writer.writerow(["evaluation", row["arm"], row["method"], row["format"], row["seed"], row["epoch"],
                             row.get("harmful_run", ""), values])
    print(text)


if __name__ == "__main__":
    main()
