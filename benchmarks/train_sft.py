"""The real `harness.training.sft.train_sft` (TRL SFTTrainer, LoRA, format/content losses) with the GPU fast path off and on.

One process, the same rows, model initialisation, seed and steps for every arm; each arm loads the model
afresh (random weights of a known architecture, `harness.bench.load_bench_model`) and sets
`HARNESS_FAST_TRAINING` before calling `train_sft`:

    off      HARNESS_FAST_TRAINING=0: padded micro-batches (ClassCollator), default AdamW (the path before)
    on       the default on CUDA: packed rows (PackedClassCollator), micro-batches merged where they fit
             (`fast_training.merge_accumulation`), fused AdamW

Tokens/s count real (unpadded) training tokens. `steady` is measured between the logs of step
`--skip-steps` and the last step (the tokens of the micro-batches in between, counted in the collators);
`end_to_end` is the whole `train_sft` call (tokenisation, trainer set-up, compilation, checkpoint save).
Peak memory is `torch.cuda.max_memory_allocated` over the call. Every step's train_loss,
train_loss_format and train_loss_content are kept and compared with the `off` arm.

    python3 benchmarks/train_sft.py --data-dir DIR --tokenizer DIR --json OUT.json

`--data-dir` holds `wikihow_lists_summary/wikihow_lists_summary_first3000.csv` (the Study B procedures);
`--tokenizer` is a Hugging Face tokenizer directory with a chat template (SmolLM2's here: the GPU machine
has no hub access, and its ids fit every vocabulary below).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if importlib.util.find_spec("mlflow") is None:  # the GPU machine has no MLflow: train_sft only needs a run handle
    stub = types.ModuleType("tracking")
    stub.RunHandle = object
    sys.modules["tracking"] = stub

import torch  # noqa: E402

from harness.training import fast_training
from harness.training import loss_classes  # noqa: E402
from harness.bench import load_bench_model  # noqa: E402
from harness.config import TrainConfig  # noqa: E402
from harness.data.registry import load_procedures  # noqa: E402
from harness.data.formats import build_task_rows  # noqa: E402
from harness.training.sft import train_sft  # noqa: E402

ARMS = {"off": "0", "on": "1"}
LOSSES = ("train_loss", "train_loss_format", "train_loss_content")


class StepLog:
    """A run handle that keeps every step's metrics and the time they arrived."""

    resumed = False  # a fresh run: nothing to resume

    def __init__(self):
        self.steps: list[tuple[float, int, dict]] = []

    def last_step(self, name):
        return None

    def log_metrics(self, metrics, step=0):
        if "train_loss" in metrics:
            self.steps.append((time.perf_counter(), step, dict(metrics)))

    def set_tags(self, tags):
        pass


def count_tokens(calls: list[int]) -> None:
    """Record the real tokens of every batch either collator builds (in order)."""
    for cls in (loss_classes.ClassCollator, fast_training.PackedClassCollator):
        original = cls.__call__

        def counted(self, features, _original=original):
            calls.append(sum(len(f["input_ids"]) for f in features))
            return _original(self, features)

        cls.__call__ = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--format", default="json", choices=["prose", "list", "json"])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--arms", default="off,on")
    parser.add_argument("--skip-steps", type=int, default=3, help="steps left out of the steady-state window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()  # on CPU (a smoke test) the fast path stays off in every arm

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = build_task_rows(load_procedures(args.data_dir)[: args.rows], args.format)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch, grad_accum=args.grad_accum, max_length=args.max_length,
        learning_rate=args.learning_rate,
    )
    lengths = [len(loss_classes.tokenize_row(tokenizer, row, max_length=args.max_length)["input_ids"]) for row in rows]
    calls: list[int] = []
    count_tokens(calls)
    result = {
        "model": args.model, "random_weights": True, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "trl": __import__("trl").__version__, "peft": __import__("peft").__version__,
        "data": f"wikihow procedures, {args.format} format", "rows": len(rows),
        "mean_tokens_per_row": round(sum(lengths) / len(lengths), 1), "max_tokens_per_row": max(lengths),
        "train_config": cfg.model_dump(mode="json"),
        "fast_path_batch_and_accumulation": fast_training.merge_accumulation(lengths, args.batch, args.grad_accum, args.max_length),
        "arms": {},
    }
    for arm in args.arms.split(","):
        os.environ["HARNESS_FAST_TRAINING"] = ARMS[arm]
        model, _ = load_bench_model(args.model)  # the same random weights every time (seeded)
        run, calls[:] = StepLog(), []
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            checkpoints = train_sft(model, tokenizer, rows, [], cfg, seed=args.seed, output_dir=Path(out), run=run)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        steps = run.steps
        per_step = len(calls) // len(steps)  # micro-batches a step (grad_accum; no evaluation here)
        skip = min(args.skip_steps, len(steps) - 2)
        window = steps[-1][0] - steps[skip - 1][0] if skip else steps[-1][0] - start
        window_tokens = sum(calls[skip * per_step :])
        result["arms"][arm] = {
            "HARNESS_FAST_TRAINING": ARMS[arm], "steps": len(steps), "micro_batches_per_step": per_step,
            "checkpoints": len(checkpoints),
            "tokens": sum(calls), "end_to_end_s": round(seconds, 2),
            "end_to_end_tokens_per_second": round(sum(calls) / seconds, 1),
            "steady_steps": len(steps) - skip, "steady_s": round(window, 3),
            "steady_tokens_per_second": round(window_tokens / window, 1), "peak_memory_gib": round(peak, 2),
            "losses": {key: [s[2].get(key) for s in steps] for key in LOSSES},
        }
        print(json.dumps({k: v for k, v in result["arms"][arm].items() if k != "losses"}), flush=True)
        del model
        if args.json:
            write(result, args.json)
    summarize(result)
    if args.json:
        write(result, args.json)
    print(json.dumps(result["summary"], indent=2))


def summarize(result: dict) -> None:
    arms = result["arms"]
    base = arms.get("off")
    summary = {}
    for arm, r in arms.items():
        row = {"steady_tokens_per_second": r["steady_tokens_per_second"],
               "end_to_end_tokens_per_second": r["end_to_end_tokens_per_second"], "peak_memory_gib": r["peak_memory_gib"],
               "final_train_loss": r["losses"]["train_loss"][-1]}
        if base is not None and arm != "off":
            row["steady_ratio"] = round(r["steady_tokens_per_second"] / base["steady_tokens_per_second"], 2)
            row["end_to_end_ratio"] = round(r["end_to_end_tokens_per_second"] / base["end_to_end_tokens_per_second"], 2)
            for key in LOSSES:
                pairs = [(a, b) for a, b in zip(base["losses"][key], r["losses"][key]) if a is not None and b is not None]
                row[f"max_rel_diff_{key}"] = float(f"{max(abs(a - b) / abs(a) for a, b in pairs):.3g}") if pairs else None
        summary[arm] = row
    result["summary"] = summary


def write(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
