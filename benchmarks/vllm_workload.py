"""Issue 22, measurements 2 and 3 on a trained study's store: the real evaluation workload, engine against engine.

Both read what the store holds, so the prompts are exactly the evaluation's (scripts/gpu-vllm*.sh and
gpu-one-h200.sh ran the steps, with `eval.engine: vllm`, which issue 22 then removed; the records stay readable):

    python benchmarks/vllm_workload.py agreement --study NAME --out agreement.json
        Measurement 3: for every model state, the share of greedy replies that HF (`eval.engine: hf`) and vLLM
        generated identically; for those that differ, the first differing token and the HF model's logit gap between
        the two choices there (a gap of bf16 rounding size is a near-tie any change of kernel can flip).
    python benchmarks/vllm_workload.py steps --study NAME --out steps.csv
        Every evaluation step side by side (a step: one `harness evaluate` process, its runs' `harness.owner`): each
        state's headline metrics per step, decoding and judge, so a change of engine that moves ASR shows beyond
        the intervals, and each step's span in the store (first run's start to last run's end), its first state's
        records and its time per state after that. Needs no GPU: it reads the packed store.
    python benchmarks/vllm_workload.py judges --study NAME --judge strongreject --out judges.json
        A judge served by vLLM (`judges[].engine: vllm`, tagged `NAME:VERSION@vllm`) against the same judge on HF,
        on the same stored replies (evaluation runs paired by their generation run): per benchmark and decoding,
        the share of replies given the same score, the same verdict and the same raw answer, and each side's ASR and
        mean score. Needs no GPU.

The end-to-end comparison (`harness evaluate` wall-clock per engine) is timed by the script that runs them. The
`multilora` and `startup` arms, which timed vLLM's own engine, went with it; neither finished on a GPU (they are
in the history up to commit 2142397).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow

from harness.analysis.consistency import per_prompt_values
from harness.bench import explain_difference
from harness.generation.batched import prompt_ids, prompt_text
from harness.models import load_adapter, load_model, unload_adapter
from tracking.schema import HARMFUL_MIX, WIKIHOW, XSTEST_SAFE, XSTEST_UNSAFE, Metric


def study_experiment(client, study: str):
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise SystemExit(f"no experiment named {study!r} in {mlflow.get_tracking_uri()}")
    return experiment


def study_states(client, study: str) -> list[dict]:
    """The study's model states: the base and every checkpoint (not the soft-prompt evaluations), in run order."""
    experiment = study_experiment(client, study)
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.kind` = 'checkpoint'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    states = []
    for run in runs:
        tags = run.data.tags
        if tags.get("harness.soft_prompt") in ("True", "true"):
            continue
        label = "base" if tags.get("harness.method") == "base" else \
            f"{tags.get('harness.method')}/{tags.get('harness.format', tags.get('harness.dataset'))}/s{tags.get('harness.seed')}/e{tags.get('harness.epoch')}"
        states.append({"label": label, "run_id": run.info.run_id, "adapter": tags.get("harness.adapter_path") or None,
                       "experiment_id": experiment.experiment_id})
    return states


def stored_table(run_id: str, artifact: str) -> dict:
    """A run's logged table artifact (`generations.json`, `per_prompt.json`) as MLflow wrote it: columns and data."""
    return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact)).read_text())


def table_rows(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def greedy_generations(client, state: dict) -> dict[tuple[str, str, str], tuple[list[str], list[str]]]:
    """(engine, benchmark, eval seed) -> (prompts, replies) of the state's greedy generation runs."""
    runs = client.search_runs([state["experiment_id"]],
                              f"tags.`mlflow.parentRunId` = '{state['run_id']}' and tags.`harness.kind` = 'generation' "
                              "and tags.`harness.temperature` = '0.0'", max_results=1000)
    found = {}
    for run in runs:
        rows = table_rows(stored_table(run.info.run_id, "generations.json"))
        key = (run.data.tags.get("harness.engine", "hf"), run.data.tags["harness.benchmark"],
               run.data.params.get("seed_eval", "?"))
        found[key] = ([row["prompt"] for row in rows], [row["response"] for row in rows])
    return found


def agreement(study: str, model_spec: str, limit_gaps: int) -> dict:
    client = mlflow.MlflowClient()
    model, tokenizer = load_model(model_spec)
    rows, totals = [], {"compared": 0, "identical": 0, "gaps": []}
    for state in study_states(client, study):
        generations = greedy_generations(client, state)
        pairs = [(key, other) for key in generations if key[0] == "hf"
                 for other in generations if other[0] == "vllm" and other[1] == key[1]]
        if not pairs:
            continue
        net = load_adapter(model, state["adapter"]) if state["adapter"] else model
        row = {"state": state["label"], "compared": 0, "identical": 0, "gaps": []}
        for hf_key, vllm_key in pairs:
            prompts, hf_replies = generations[hf_key]
            vllm_prompts, vllm_replies = generations[vllm_key]
            assert prompts == vllm_prompts, f"{state['label']} {hf_key[1]}: the two engines saw other prompts"
            for prompt, a, b in zip(prompts, hf_replies, vllm_replies):
                row["compared"] += 1
                if a == b:
                    row["identical"] += 1
                    continue
                if len(row["gaps"]) >= limit_gaps:
                    continue
                context = prompt_ids(tokenizer, prompt_text(tokenizer, [{"role": "user", "content": prompt}]))
                difference = explain_difference(net, context, tokenizer(a, add_special_tokens=False)["input_ids"],
                                                tokenizer(b, add_special_tokens=False)["input_ids"])
                if difference["plain_token"] is None:  # one is a prefix of the other: an EOS choice
                    row["gaps"].append({"position": difference["position"], "kind": "length", "logit_gap": None})
                else:
                    row["gaps"].append({"position": difference["position"], "kind": "token",
                                        "logit_gap": difference["logit_gap"]})
        if state["adapter"]:
            model = unload_adapter(net)
        token_gaps = sorted(abs(g["logit_gap"]) for g in row["gaps"] if g["logit_gap"] is not None)
        row["share_identical"] = round(row["identical"] / row["compared"], 3)
        row["median_abs_gap"] = token_gaps[len(token_gaps) // 2] if token_gaps else None
        row["max_abs_gap"] = token_gaps[-1] if token_gaps else None
        row["gaps_under_0.5"] = sum(g < 0.5 for g in token_gaps)
        row["gaps_measured"] = len(token_gaps)
        print(f"{row['state']:<24} identical {row['identical']}/{row['compared']} ({row['share_identical']:.1%}); "
              f"logit gaps at the first difference: median {row['median_abs_gap']}, max {row['max_abs_gap']}, "
              f"{row['gaps_under_0.5']}/{row['gaps_measured']} under 0.5", flush=True)
        totals["compared"] += row["compared"]
        totals["identical"] += row["identical"]
        totals["gaps"] += token_gaps
        rows.append(row)
    gaps = sorted(totals.pop("gaps"))
    totals.update(share_identical=round(totals["identical"] / max(totals["compared"], 1), 4),
                  median_abs_gap=gaps[len(gaps) // 2] if gaps else None, max_abs_gap=gaps[-1] if gaps else None,
                  gaps_under_0_5=sum(g < 0.5 for g in gaps), gaps_measured=len(gaps))
    print("all states:", totals, flush=True)
    return {"measurement": "greedy agreement, HF generate vs vLLM", "study": study, "states": rows, "total": totals}


STEP_METRICS = {HARMFUL_MIX: (Metric.ASR, Metric.ASR_CI_LOW, Metric.ASR_CI_HIGH), XSTEST_UNSAFE: (Metric.ASR,),
                XSTEST_SAFE: (Metric.OVER_REFUSAL_RATE,),
                WIKIHOW: (Metric.ROUGE_L, Metric.SBERT, Metric.FORMAT_ADHERENCE)}
"""The metrics `steps` reads per benchmark (the summary table's headline columns; qlora_study_b.py's
`checkpoint_rows` reads the same ones into its own table)."""


def steps(study: str) -> tuple[list[dict], list[dict]]:
    """(per-state metric rows, per-step timing rows) of every evaluation step in the study's store. A step is one
    `harness evaluate` process (the runs' `harness.owner`), so two steps with the same engine and overlapping repeat
    seeds stay apart, and a step that only judges stored generations is a step of its own. Metric rows are per state,
    decoding (temperature and repeat) and judge."""
    client = mlflow.MlflowClient()
    experiment = study_experiment(client, study)
    runs = [run for kind in ("generation", "evaluation")
            for run in client.search_runs([experiment.experiment_id], f"tags.`harness.kind` = '{kind}'",
                                          max_results=5000)]
    metrics: dict[tuple, dict] = {}
    spans: dict[str, dict] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        owner = tags.get("harness.owner", "?")
        state = "base" if tags.get("harness.method") == "base" else \
            f"{tags.get('harness.method')}/{tags.get('harness.format')}/e{tags.get('harness.epoch')}"
        span = spans.setdefault(owner, {"start": float("inf"), "end": 0, "state_end": {}, "engines": set(),
                                        "seeds": set(), "made": {"generation": 0, "evaluation": 0},
                                        "fast_generation": tags.get("harness.fast_generation"),
                                        "overrides": tags.get("harness.runtime_overrides", "")})
        span["start"] = min(span["start"], run.info.start_time)
        span["end"] = max(span["end"], run.info.end_time or 0)
        span["state_end"][state] = max(span["state_end"].get(state, 0), run.info.end_time or 0)
        span["made"][tags["harness.kind"]] += 1
        if "harness.engine" in tags:
            span["engines"].add(tags["harness.engine"])
        if params.get("seed_eval", "?").isdigit():  # the step's eval.seed: repeat r is generated with eval.seed + r
            span["seeds"].add(int(params["seed_eval"]) - int(params.get("repeat", 0)))
        benchmark = tags.get("harness.benchmark")
        if tags.get("harness.kind") != "evaluation" or benchmark not in STEP_METRICS:
            continue
        decoding = f"T{float(tags.get('harness.temperature', 0)):g}-r{tags.get('harness.repeat', 0)}"
        judge = tags.get("harness.judge", "?").split(":")[0]
        row = metrics.setdefault((state, owner, decoding, judge),
                                 {"state": state, "step": owner, "decoding": decoding, "judge": judge})
        for name in STEP_METRICS[benchmark]:
            if name in run.data.metrics:
                row[f"{benchmark}.{name}"] = round(run.data.metrics[name], 3)
    timing = []
    for owner, span in sorted(spans.items(), key=lambda item: item[1]["start"]):
        ends = sorted(span["state_end"].values())
        timing.append({"step": owner, "engine": "+".join(sorted(span["engines"])) or "?",
                       "seed_eval": "+".join(map(str, sorted(span["seeds"]))) or "?",
                       "fast_generation": span["fast_generation"], "overrides": span["overrides"],
                       "runs": span["made"], "states": len(ends),
                       "span_seconds": round((span["end"] - span["start"]) / 1000, 1),
                       "first_state_seconds": round((ends[0] - span["start"]) / 1000, 1),
                       "per_state_after_seconds": round((ends[-1] - ends[0]) / 1000 / max(len(ends) - 1, 1), 1)})
    for row in metrics.values():  # the step's engine and seed beside its owner, for readers of the CSV
        step = next(item for item in timing if item["step"] == row["step"])
        row["engine"], row["seed_eval"] = step["engine"], step["seed_eval"]
    return sorted(metrics.values(), key=lambda row: (row["state"], row["step"], row["decoding"], row["judge"])), timing


def judges(study: str, judge: str) -> dict:
    """The `judge` served by vLLM against the same judge on HF, reply by reply (see the module's docstring)."""
    client = mlflow.MlflowClient()
    experiment = study_experiment(client, study)
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.kind` = 'evaluation'", max_results=5000)
    sides: dict[tuple[str, str], dict] = {}  # (generation run, benchmark) -> {"hf"|"vllm": evaluation run}
    for run in runs:
        tags = run.data.tags
        name, _, served_by = tags.get("harness.judge", "").partition("@")
        if name.split(":")[0] != judge:
            continue
        key = (tags["harness.generation_run"], tags["harness.benchmark"])
        sides.setdefault(key, {})[served_by or "hf"] = run
    rows = []
    for (generation_run, benchmark), pair in sorted(sides.items()):
        if set(pair) != {"hf", "vllm"}:
            continue
        tables = {side: stored_table(run.info.run_id, "per_prompt.json") for side, run in pair.items()}
        hf, served = table_rows(tables["hf"]), table_rows(tables["vllm"])
        if [row["response"] for row in hf] != [row["response"] for row in served]:
            raise SystemExit(f"evaluations {[run.info.run_id for run in pair.values()]} judged different replies")
        tags, n = pair["hf"].data.tags, len(hf)

        def share(column: str) -> float:
            return round(sum(a[column] == b[column] for a, b in zip(hf, served)) / n, 4)

        def asr(side: str) -> float:  # the harness's own per-prompt rule: a parse failure counts as harmful
            return round(float(per_prompt_values(tables[side], Metric.ASR)[1].mean()), 4)

        def mean_score(table: list[dict]) -> float | None:
            scores = [row["score"] for row in table if row["score"] is not None]
            return round(sum(scores) / len(scores), 4) if scores else None

        rows.append({"benchmark": benchmark, "generation_run": generation_run,
                     "decoding": f"T{float(tags.get('harness.temperature', 0)):g}-r{tags.get('harness.repeat', 0)}",
                     "replies": n, "same_score": share("score"), "same_verdict": share("harmful"),
                     "same_raw": share("judge_raw"), "asr_hf": asr("hf"), "asr_vllm": asr("vllm"),
                     "score_hf": mean_score(hf), "score_vllm": mean_score(served),
                     "unparsed_hf": sum(row["score"] is None for row in hf),
                     "unparsed_vllm": sum(row["score"] is None for row in served)})
    if not rows:
        raise SystemExit(f"no reply of {study!r} was judged by {judge!r} both on HF and served by vLLM")
    total = sum(row["replies"] for row in rows)
    overall = {column: round(sum(row[column] * row["replies"] for row in rows) / total, 4)
               for column in ("same_score", "same_verdict", "same_raw", "asr_hf", "asr_vllm")}
    return {"study": study, "judge": judge, "replies": total, "overall": overall, "evaluations": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["agreement", "steps", "judges"])
    parser.add_argument("--study", required=True)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--judge", default="strongreject", help="judges: the judge to compare, HF against vLLM")
    parser.add_argument("--gaps", type=int, default=64, help="agreement: logit gaps measured per state at most")
    args = parser.parse_args()
    if args.what == "steps":
        import csv

        rows, timing = steps(args.study)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with args.out.open("w", newline="") as out:
            writer = csv.DictWriter(out, columns)
            writer.writeheader()
            writer.writerows(rows)
        for row in timing:
            print(row)
        print("wrote", args.out)
        return
    if args.what == "judges":
        result = judges(args.study, args.judge)
        print(json.dumps(result["overall"]), result["replies"], "replies")
    else:
        result = agreement(args.study, args.model, args.gaps)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
