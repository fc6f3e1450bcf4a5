#!/usr/bin/env bash
# Study B on the GPU machine (docs/results/study_b_qwen2.5-coder-1.5b.md), exactly as run. That machine has no
# network: the model's wheels, the harness's missing dependencies (wheels) and ../shared/data (a tarball) arrive
# staged under /root/stage/out (../shared/tools/stage-chunks). From the repository root:
#     bash scripts/gpu-study-b.sh setup      install what is missing, unpack the data, start the MLflow server
#                                            (STORE=store.tgz: on the store an earlier machine packed)
#     bash scripts/gpu-study-b.sh validate   measure both judges against human labels (same store)
#     bash scripts/gpu-study-b.sh start      the study, one seed after the other, in the background (resumable)
#     bash scripts/gpu-study-b.sh promot     what the SFT arms leave: the list/JSON ProMoT arms and the prose
#                                            learning-rate sweep (whose 5e-5 trial is the prose ProMoT arm) side by
#                                            side on the GPU, the sweep's second worker once the arms are done,
#                                            then `harness run` on the whole study (reuses every unit);
#                                            GRACE=120 after a machine was taken back mid-trial
#     bash scripts/gpu-study-b.sh tpe        then 2 TPE trials continuing the sweep's Optuna study (2 workers)
#     bash scripts/gpu-study-b.sh wait N     follow the logs for up to N seconds
#     bash scripts/gpu-study-b.sh pack DIR   the MLflow store (no adapters) and optuna.db as a tarball
set -euo pipefail
work=${WORK:-/root/work}
export PYTHONPATH=/root/site HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HARNESS_PROMOT_MICRO_BATCH=${HARNESS_PROMOT_MICRO_BATCH:-4}  # fp32 ProMoT at batch 16 ran out of 80 GB
optuna="sqlite:///$work/optuna.db"
harness() { python3 -m harness.cli.main "$@"; }
case "${1:-}" in
setup)
    mkdir -p "$work" /root/site
    bash "$(dirname "$0")/gpu-install-wheels.sh"  # only what the image lacks
    mkdir -p "$work/shared" && tar xzf /root/stage/out/shared-data.tgz -C "$work/shared"
    if [ -n "${STORE:-}" ]; then  # continue a study packed by `pack` on an earlier machine
        tar xzf "$STORE" -C "$work" && mv "$work/mlflow-copy.db" "$work/mlflow.db"
        if [ -f "$work/optuna-copy.db" ]; then mv "$work/optuna-copy.db" "$work/optuna.db"; fi
    fi
    setsid python3 -m mlflow server --backend-store-uri "sqlite:///$work/mlflow.db" \
        --artifacts-destination "$work/artifacts" --host 127.0.0.1 --port 5000 --workers 2 \
        > "$work/mlflow-server.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do curl -sf http://127.0.0.1:5000/health >/dev/null && break; sleep 1; done
    curl -sf http://127.0.0.1:5000/health && echo " mlflow server up"
    python3 -c "import torch, transformers, peft, mlflow, optuna, trl; print(torch.__version__, transformers.__version__, peft.__version__, mlflow.__version__, optuna.__version__, trl.__version__, torch.cuda.get_device_name())"
    ;;
validate)
    harness judges validate --judge keyword --judge llm --judge-model qwen2.5-coder-1.5b-instruct --max-new-tokens 48 \
        --batch-size 128 --limit 300 2>&1 | tee "$work/validate.log"
    ;;
start)
    # One YAML per seed (seed 1 leaves the base model to seed 0), run in turn in the background; same store.
    cd "$(dirname "$0")/.."
    python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
for seed in cfg["seeds"]:
    part = {**cfg, "seeds": [seed], "output_dir": f"/root/work/outputs-seed{seed}"}
    part["eval"] = {**cfg["eval"], "evaluate_base": seed == cfg["seeds"][0]}
    yaml.safe_dump(part, open(f"/root/work/study_b_seed{seed}.yaml", "w"), sort_keys=False)
PY
    # One seed after the other: two processes with a judge model and fp32 ProMoT did not fit in 80 GB together.
    setsid bash -c "for seed in 0 1; do python3 -m harness.cli.main run $work/study_b_seed\$seed.yaml > $work/run-seed\$seed.log 2>&1; done" \
        < /dev/null > /dev/null 2>&1 &
    sleep 5; tail -n 3 "$work"/run-seed*.log
    ;;
promot)
    cd "$(dirname "$0")/.."
    python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
arms = {**cfg, "data": {**cfg["data"], "formats": ["list", "json"]}, "output_dir": "/root/work/outputs"}
arms["eval"] = {**cfg["eval"], "evaluate_base": False}
yaml.safe_dump(arms, open("/root/work/study_b_list_json.yaml", "w"), sort_keys=False)
PY
    # On a fresh machine after the last one was taken back: GRACE=120 lets the dead machine's running trial go
    # stale after 2 minutes instead of the config's 10 (not part of the study's identity).
    sed "s/^  grace_period: .*/  grace_period: ${GRACE:-600}/" experiments/study_b_qwen1.5b_sweep.yaml > $work/sweep.yaml
    sweep="harness.cli.main sweep $work/sweep.yaml --storage $optuna"
    setsid bash -c "
        (python3 -m harness.cli.main run $work/study_b_list_json.yaml > $work/run-arms.log 2>&1;
         python3 -m $sweep > $work/sweep-w2.log 2>&1) &
        (sleep 20; python3 -m $sweep > $work/sweep-w1.log 2>&1) &
        wait
        python3 -m harness.cli.main run experiments/study_b_qwen1.5b.yaml > $work/run-final.log 2>&1" \
        < /dev/null > /dev/null 2>&1 &
    sleep 5; echo started
    ;;
tpe)
    # What Optuna adds: 2 TPE trials continuing the grid's study, one per worker (after `promot`).
    cd "$(dirname "$0")/.."
    sed "s/^  grace_period: .*/  grace_period: ${GRACE:-600}/" experiments/study_b_qwen1.5b_sweep_tpe.yaml > $work/sweep_tpe.yaml
    setsid python3 -m harness.cli.main sweep $work/sweep_tpe.yaml --storage $optuna --workers 2 \
        < /dev/null > $work/sweep-tpe.log 2>&1 &
    sleep 5; echo started
    ;;
wait)
    end=$((SECONDS + ${2:-500}))
    while [ $SECONDS -lt $end ] && pgrep -f "harness.cli.main (run|sweep)" >/dev/null; do sleep 10; done
    for f in "$work"/run-*.log "$work"/sweep-*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 8; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
pack)
    out=${2:?output directory}
    sqlite3 "$work/mlflow.db" ".backup '$work/mlflow-copy.db'" 2>/dev/null || python3 -c "
import sqlite3; s=sqlite3.connect('$work/mlflow.db'); d=sqlite3.connect('$work/mlflow-copy.db'); s.backup(d)"
    files="mlflow-copy.db artifacts"
    if [ -f "$work/optuna.db" ]; then
        python3 -c "
import sqlite3; s=sqlite3.connect('$work/optuna.db'); d=sqlite3.connect('$work/optuna-copy.db'); s.backup(d)"
        files="$files optuna-copy.db"
    fi
    tar czf "$out/store.tgz" -C "$work" $files
    cp "$work"/run-*.log "$work"/sweep-*.log "$work"/validate.log "$out/" 2>/dev/null || true
    ls -la "$out"
    ;;
*) echo "usage: bash scripts/gpu-study-b.sh setup|validate|start|promot|tpe|wait N|pack DIR" >&2; exit 2 ;;
esac
