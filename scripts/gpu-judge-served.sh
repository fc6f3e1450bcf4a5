#!/usr/bin/env bash
# Issue 22's last GPU check, on the code as it stands after the vLLM generation engine was removed: a judge served by
# vLLM as a user configures it (`judges[].engine: vllm`), against the same judge on HF's path, on the same stored
# replies. One H200; staged as for gpu-vllm-one.sh (the 1.5B model's wheels, .whl/, the S-BERT wheel,
# shared-data.tgz, the vLLM set of ../shared/gpu/VLLM.md and scripts/vllm-server-wheels.txt, under /root/stage/out).
# From the repository root:
#     bash scripts/gpu-judge-served.sh setup    install (vLLM too), unpack, start MLflow, convert the model, write configs
#     bash scripts/gpu-judge-served.sh start    in the background, one after the other, each alone on the GPU:
#        0. `harness check` on the served judge's YAML (its gpu step says whether vLLM can serve the judge)
#        1. the base 1.5B's replies at Study A's decodings (greedy + 5 sampled repeats, 850 prompts each: 5,100),
#           keyword judge only
#        2. StrongREJECT with the 1.5B as grader on HF's path (`engine: hf`): 3,900 replies, found in the store
#        3. the same with `engine: vllm`: the harness starts vLLM's OpenAI-compatible server for the grader
#     bash scripts/gpu-judge-served.sh wait N   follow the logs for up to N seconds
#     bash scripts/gpu-judge-served.sh pack     timings, logs, configs, the store, and the two judges compared reply by
#                                               reply (benchmarks/vllm_workload.py judges)
#     As run on 2026-12-02 at 3b13682 (benchmarks/h200-judge-served/, RESULTS.md "A judge served by vLLM"): every step
#     finished in 7.8 min on the GPU, after 26 staged folders and a 164 s setup. `pack` leaves the per-reply judge
#     answers (the evaluations' per_prompt.json) on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export work=${WORK:-/root/work}
model=qwen2.5-coder-1.5b-instruct
study=judge_served_qwen1.5b
source scripts/gpu-lanes.sh  # gpu_environment, vllm_setup, timed, follow_lanes, pack_lanes
gpu_environment
case "${1:-}" in
setup)
    bash scripts/gpu-study-b.sh setup
    vllm_setup $model
    python3 - <<'PY'
import os
import yaml
work = os.environ["work"]
study_b = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
# Nothing is trained: `harness evaluate` evaluates the base model only (the fine-tunes stay untrained).
base = {**study_b, "name": "judge_served_qwen1.5b", "seeds": [0], "output_dir": f"{work}/outputs",
        "train": {**study_b["train"], "methods": ["sft"]}}
study_a = [{"temperature": 0, "max_new_tokens": 256},
           {"temperature": 0.7, "min_p": 0.1, "max_new_tokens": 256, "repeats": 5}]
grader = {"name": "strongreject", "model": "qwen2.5-coder-1.5b-instruct"}
def evaluation(name, judges):
    cfg = {**base, "eval": {**base["eval"], "cache": False, "seed": 21, "decoding": study_a, "judges": judges}}
    yaml.safe_dump(cfg, open(f"{work}/{name}.yaml", "w"), sort_keys=False)
evaluation("generate", [{"name": "keyword"}])
evaluation("judge-hf", [{"name": "keyword"}, grader])
evaluation("judge-vllm", [{"name": "keyword"}, {**grader, "engine": "vllm"}])
PY
    ls "$work"/*.yaml
    ;;
start)
    : > "$work/timings.txt"
    setsid bash -c "
        timed check python3 -m harness.cli.main check $work/judge-vllm.yaml
        timed generate python3 -m harness.cli.main evaluate $work/generate.yaml
        timed judge-hf python3 -m harness.cli.main evaluate $work/judge-hf.yaml
        timed judge-vllm python3 -m harness.cli.main evaluate $work/judge-vllm.yaml
        timed compare python3 benchmarks/vllm_workload.py judges --study $study --judge strongreject \
            --out $work/judges.json
        timed steps python3 benchmarks/vllm_workload.py steps --study $study --out $work/steps.csv
        echo done > $work/all-done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo started
    ;;
wait)
    follow_lanes "${2:-60}" all-done
    ;;
pack)
    pack_lanes
    cp "$work"/steps.csv "$OUT"/ 2>/dev/null || true
    cp "$work"/outputs/logs/judge-server-*.log "$OUT"/ 2>/dev/null || true
    ;;
*) echo "usage: bash scripts/gpu-judge-served.sh setup|start|wait N|pack" >&2; exit 2 ;;
esac
