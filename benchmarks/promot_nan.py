"""Which numerics keep ProMoT stage 1 finite on the GPU (issue 12)?

On the H100, Qwen2.5-Coder-1.5B's stage 1 (soft prompt at LR 0.1) hit a non-finite gradient norm in 4 of 6
runs under bfloat16 + SDPA. This trains the same stage 1 (rows from the study YAML) once per arm, each a fresh
model, and reports the first non-finite step and the time. Arms: PRECISION-ATTENTION, e.g. bf16-sdpa,fp32-sdpa.

    python3 benchmarks/promot_nan.py experiments/study_b_qwen1.5b.yaml --format prose --seed 0 \
        --arms bf16-sdpa,bf16-eager,fp32-sdpa --json $OUT/promot-nan.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from harness.training import promot
from harness.config import load_config
from harness.models import load_model
from harness.study.runner import prepare_data
from harness.training.sft import TrainingDiverged


class StepRecorder:
    """The slice of a run handle that stage 1 uses; keeps each step's metrics."""

    resumed = False

    def __init__(self):
        self.steps: list[dict] = []
        self.tags: dict = {}

    def log_metrics(self, metrics, step=0):
        self.steps.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def set_tags(self, tags):
        self.tags.update(tags)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--format", default="prose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="bf16-sdpa,bf16-eager,fp32-sdpa")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    cfg = load_config(args.config)
    rows = prepare_data(cfg).train[args.format]
    results = []
    for arm in args.arms.split(","):
        precision, attention = arm.split("-")
        os.environ["HARNESS_PROMOT_PRECISION"], os.environ["HARNESS_PROMOT_ATTENTION"] = precision, attention
        model, tokenizer = load_model(cfg.model)
        run = StepRecorder()
        start, error = time.perf_counter(), None
        try:
            with tempfile.TemporaryDirectory() as folder:
                prompt = promot.train_stage1(model, tokenizer, rows, cfg.train.promot, cfg.train, seed=args.seed,
                                             output_dir=Path(folder), run=run, meta={"model": cfg.model})
            finite = bool(torch.isfinite(prompt.embeddings).all())
        except TrainingDiverged as diverged:
            error, finite = str(diverged), False
        torch.cuda.synchronize()
        result = {"arm": arm, "finite": finite, "error": error, "seconds": round(time.perf_counter() - start, 1),
                  "steps": len([s for s in run.steps if "train_loss" in s]), "tags": run.tags,
                  "max_grad_norm": max((s.get("grad_norm", 0.0) for s in run.steps), default=None),
                  "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps(result), flush=True)
        results.append(result)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path(args.json).write_text(json.dumps({"format": args.format, "seed": args.seed, "results": results}, indent=1))


if __name__ == "__main__":
    main()
