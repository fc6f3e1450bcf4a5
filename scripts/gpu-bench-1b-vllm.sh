#!/usr/bin/env bash
# Issue 22's measurement 1 on the 1B architecture (the 8B ran on 2026-12-01, benchmarks/RESULTS.md section 1):
# `harness bench --vllm`, which left with the vLLM generation engine (e70d207), so it runs from the last commit
# that had it, exported beside the working tree (ignored by git, carried to the GPU machine as an untracked folder):
#     git archive 2142397 harness tracking pyproject.toml | tar -x -C .oldharness
# Staged: .whl/ and the vLLM set of ../shared/gpu/VLLM.md under /root/stage/out (no model or data: random weights).
# From the repository root on one H200:
#     OUT=... bash scripts/gpu-bench-1b-vllm.sh    install what is missing, then plain `generate`, the harness engine
#                                                  and vLLM on the same prompts in one process; JSON in $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu-install-wheels.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
    /root/stage/out/typing_extensions-*.whl 2>&1 | tail -2
export PYTHONPATH=/root/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_NO_USAGE_STATS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
# The 8B's command with the 1B's best plain batch on this mix (1,024: benchmarks/RESULTS.md, H100 table) and twice
# the prompts, so every path fills that batch twice.
cd .oldharness  # `python -m` puts the current folder first: the old package, not this checkout's
python3 -m harness.cli.main bench --model llama-3.2-1b --prompts 2048 --batch 1024 --max-new-tokens 256 \
    --decoding both --vllm --json "$OUT/bench-1b.json" 2>&1 | tr '\r' '\n' | grep -av "it/s\]$" | tail -40
