#!/usr/bin/env bash
# Issue 21's judge measurements on the GPU machine (docs/results/judges_qwen2.5-coder-1.5b.md), exactly as run. That
# machine has no network: the model's wheels, the harness's missing dependencies (.whl/) and the judge-validation
# data (judge-data.tgz) arrive staged under /root/stage/out (../shared/tools/stage-chunks). From the repo root:
#     bash scripts/gpu-judges.sh setup          install what is missing, unpack the data
#     bash scripts/gpu-judges.sh train          the trained judge on every set's calibration split (1.5B, LoRA)
#     bash scripts/gpu-judges.sh validate       keyword, llm (1.5B, probabilities) and the trained judge, test splits
#     bash scripts/gpu-judges.sh loso GROUP...  leave-one-set-out: train without GROUP's sets, validate on them
#                                               (groups: beavertails pku gptfuzz xstest)
#     bash scripts/gpu-judges.sh strongreject N the StrongREJECT rubric on the 1.5B, N rows per set
set -uo pipefail  # loso goes on to the next group when one fails
work=${WORK:-/root/work}
export PYTHONPATH=/root/site HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export HARNESS_CACHE_DIR=$work/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
store="sqlite:///$work/mlflow.db"
base=qwen2.5-coder-1.5b-instruct
harness() { python3 -m harness.cli.main "$@"; }
declare -A group=(
    [beavertails]="beavertails_30k_test" [pku]="pku_saferlhf_test2k" [gptfuzz]="gptfuzz_labeled_responses"
    [xstest]="xstest_resp_harm xstest_resp_refusal xstest_completions_human")
case "${1:-}" in
setup)
    mkdir -p "$work/shared" /root/site
    bash "$(dirname "$0")/gpu-install-wheels.sh"  # only what the image lacks
    tar xzf /root/stage/out/judge-data.tgz -C "$work/shared"
    python3 -c "import torch, transformers, peft, mlflow, trl; print(torch.__version__, transformers.__version__, peft.__version__, mlflow.__version__, trl.__version__, torch.cuda.get_device_name())"
    ;;
train)
    time harness judges train --out "$work/judge" --base $base --tracking-uri "$store" 2>&1 | tee "$work/train.log"
    ;;
validate)
    time harness judges validate --judge keyword --judge llm --judge-model $base --judge trained \
        --judge-path "$work/judge" --batch-size 64 --tracking-uri "$store" 2>&1 | tee "$work/validate.log"
    ;;
loso)
    shift
    for name in "$@"; do
        excluded=(); validate_on=()
        for one in ${group[$name]}; do excluded+=(--exclude-set "$one"); validate_on+=(--set "$one"); done
        time harness judges train --out "$work/judge-without-$name" --base $base "${excluded[@]}" ${TRAIN_ARGS:-} \
            --tracking-uri "$store" 2>&1 | tail -3 | tee -a "$work/loso.log"
        time harness judges validate --judge trained --judge-path "$work/judge-without-$name" "${validate_on[@]}" \
            --batch-size 64 --tracking-uri "$store" 2>&1 | tee -a "$work/loso.log"
    done
    ;;
strongreject)
    time harness judges validate --judge strongreject --judge-model $base --limit "${2:-100}" --batch-size 64 \
        --tracking-uri "$store" 2>&1 | tee "$work/strongreject.log"
    ;;
*)
    echo "usage: $0 setup|train|validate|loso GROUP...|strongreject N" >&2; exit 2 ;;
esac
