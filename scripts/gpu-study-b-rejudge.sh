#!/usr/bin/env bash
# Issue 21: Study B (seed 0) rerun on one GPU machine and re-judged with the judge trained here, exactly as run
# (docs/results/study_b_qwen2.5-coder-1.5b.md, "Re-judged"). Staged as for gpu-study-b.sh (model wheels, .whl/ and
# shared-data.tgz under /root/stage/out). From the repository root:
#     bash scripts/gpu-study-b.sh setup            install, unpack the data, start the MLflow server
#     bash scripts/gpu-study-b-rejudge.sh start     in the background, side by side on the one GPU:
#                                                   the trained judge (then StrongREJECT's validation, 100 rows/set),
#                                                   the list/JSON arms (SFT, ProMoT), and the prose sweep's 5-rate
#                                                   grid on two workers (its shared units: base, SFT prose, stage 1);
#                                                   then `harness run` on the whole seed-0 study (reuses every unit)
#                                                   and the re-judging below
#     bash scripts/gpu-study-b.sh wait N            follow the logs
#     bash scripts/gpu-study-b.sh pack DIR          the store
# Re-judging is `harness evaluate` on the same configs with the trained judge added: no response is generated
# again; the arms come from the study's YAML, each sweep point from the study YAML at that rate (ProMoT, prose).
set -euo pipefail
work=${WORK:-/root/work}
export PYTHONPATH=/root/site HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HARNESS_PROMOT_MICRO_BATCH=${HARNESS_PROMOT_MICRO_BATCH:-8}  # memory only; the same optimizer steps
optuna="sqlite:///$work/optuna.db"
cd "$(dirname "$0")/.."
case "${1:-}" in
start)
    python3 - <<'PY'
import yaml
work = "/root/work"
study = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
sweep = yaml.safe_load(open("experiments/study_b_qwen1.5b_sweep.yaml"))
judged = [{"name": "keyword"}, {"name": "trained", "path": f"{work}/judge"}]
def dump(cfg, name):
    yaml.safe_dump(cfg, open(f"{work}/{name}.yaml", "w"), sort_keys=False)
one = {**study, "seeds": [0], "output_dir": f"{work}/outputs"}
dump(one, "study")
dump({**one, "data": {**one["data"], "formats": ["list", "json"]}, "eval": {**one["eval"], "evaluate_base": False}},
     "arms")
dump({**sweep, "seeds": [0], "output_dir": f"{work}/outputs"}, "sweep")
dump({**one, "eval": {**one["eval"], "judges": judged}}, "rejudge-study")
for rate in sweep["sweep"]["grid"]["train.learning_rate"]:
    point = {**one, "train": {**one["train"], "methods": ["promot"], "learning_rate": rate},
             "eval": {**one["eval"], "judges": judged, "evaluate_base": False}}
    dump(point, f"rejudge-promot-{rate:g}")
PY
    setsid bash -c "
        (python3 -m harness.cli.main judges train --out $work/judge --base qwen2.5-coder-1.5b-instruct > $work/judge-train.log 2>&1;
         python3 -m harness.cli.main judges validate --judge trained --judge-path $work/judge --batch-size 64 > $work/judge-validate.log 2>&1;
         python3 -m harness.cli.main judges validate --judge strongreject --judge-model qwen2.5-coder-1.5b-instruct --limit 100 --batch-size 64 > $work/strongreject.log 2>&1) &
        (python3 -m harness.cli.main run $work/arms.yaml > $work/run-arms.log 2>&1) &
        (python3 -m harness.cli.main sweep $work/sweep.yaml --storage $optuna > $work/sweep-w1.log 2>&1) &
        (sleep 240; python3 -m harness.cli.main sweep $work/sweep.yaml --storage $optuna > $work/sweep-w2.log 2>&1) &
        wait
        python3 -m harness.cli.main run $work/study.yaml > $work/run-final.log 2>&1
        for cfg in $work/rejudge-*.yaml; do
            echo \"== \$cfg\"; python3 -m harness.cli.main evaluate \$cfg
        done > $work/run-rejudge.log 2>&1
        echo done > $work/all-done" < /dev/null > /dev/null 2>&1 &
    sleep 5; echo started
    ;;
*) echo "usage: bash scripts/gpu-study-b-rejudge.sh start" >&2; exit 2 ;;
esac
