"""The real `harness.training.sft.train_sft` (TRL SFTTrainer, LoRA, format/content losses): the GPU fast path off
and on, and QLoRA (4-bit NF4 base) with and without 8-bit AdamW.

One process, the same rows, weights, seed and steps for every arm; each arm loads the model afresh, sets
`HARNESS_FAST_TRAINING` and its `TrainConfig.optimizer`, and calls `train_sft`:

    arm           fast path  base        optimizer
    off           off        bf16        adamw_torch: padded micro-batches (ClassCollator), default AdamW (the path before)
    on            on         bf16        adamw_torch: LoRA bf16, the default on CUDA: packed rows (PackedClassCollator),
                                         micro-batches merged where they fit (`fast_training.merge_accumulation`), fused AdamW
    qlora         on         4-bit NF4   adamw_torch (fused, as `on`)
    qlora-adamw8  on         4-bit NF4   adamw_bnb_8bit (bitsandbytes' 8-bit AdamW)

`--model` is a known architecture (`harness.bench.ARCHITECTURES`: random weights, seeded) or anything
`harness.models.load_model` takes. 4-bit needs weights on disk: when an arm is 4-bit and `--model` is an
architecture, its random weights are built once and saved (safetensors, with `--tokenizer`, whose chat template
`load_model` requires) to `--weights-dir` (default: a directory in the system temp dir named after the model,
reused when it exists), and every arm then loads them with `load_model(dir, quantize_4bit=...)`, so all arms
train the same weights. Without a 4-bit arm, an architecture is built in memory per arm. A 4-bit arm without CUDA
or bitsandbytes stops the benchmark with one line before anything trains.

Tokens/s count real (unpadded) training tokens. `steady` is measured between the logs of step
`--skip-steps` and the last step (the tokens of the micro-batches in between, counted in the collators);
`end_to_end` is the whole `train_sft` call (tokenisation, trainer set-up, compilation, checkpoint save).
Peak memory over the call: `peak_memory_gib` is `torch.cuda.max_memory_allocated` (tensors), `peak_reserved_gib`
`torch.cuda.max_memory_reserved` (what the caching allocator held: tensors plus fragmentation). A card fits the
run only if it holds the reserved peak plus the CUDA context (a few hundred MiB outside the allocator), so
compare a 24 GB card with `peak_reserved_gib` + ~0.5 GiB, not with `peak_memory_gib`; `load_peak_*` is the
same for loading (4-bit quantises while it loads). Every step's train_loss, train_loss_format and
train_loss_content are kept and compared with the `off` arm; tokens/s and peaks of the QLoRA arms are also
compared with `on` (LoRA bf16). The `harness.optimizer` tag `train_sft` set is kept per arm (8-bit AdamW falls
back to adamw_torch, and says so, without CUDA or bitsandbytes).

    python3 benchmarks/train_sft.py --data-dir DIR --tokenizer DIR --json OUT.json
    # The 8B measurement (issue: QLoRA 8B training in <= 24 GB) at Study B's batch, 16 x 2, max_length 1024:
    python3 benchmarks/train_sft.py --model llama-3.1-8b --arms on,qlora,qlora-adamw8 --rows 640 --batch 16 \
        --grad-accum 2 --gradient-checkpointing --data-dir DIR --tokenizer DIR --json OUT.json

`--data-dir` holds `wikihow_lists_summary/wikihow_lists_summary_first3000.csv` (the Study B procedures);
`--tokenizer` is a Hugging Face tokenizer directory with a chat template (SmolLM2's here: the GPU machine
has no hub access, and its ids fit every vocabulary below). `--gradient-checkpointing` sets
`TrainConfig.gradient_checkpointing`; `--weights-dir` is where an architecture's random weights go for 4-bit.
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
    stub = types.ModuleType("tracking.runs")  # `tracking` loads RunHandle from here lazily; tracking.schema stays real
    stub.RunHandle = object
    sys.modules["tracking.runs"] = stub

import torch  # noqa: E402

from harness.training import fast_training  # noqa: E402
from harness.training import loss_classes  # noqa: E402
from harness.bench import ARCHITECTURES, load_bench_model  # noqa: E402
from harness.config import TrainConfig  # noqa: E402
from harness.data.registry import load_procedures  # noqa: E402
from harness.data.formats import build_task_rows  # noqa: E402
from harness.models import four_bit_unavailable, load_model  # noqa: E402
from harness.training.sft import train_sft  # noqa: E402
from tracking.schema import Tag  # noqa: E402

# arm -> HARNESS_FAST_TRAINING, 4-bit NF4 base, TrainConfig.optimizer
ARMS = {
    "off": {"HARNESS_FAST_TRAINING": "0", "quantize_4bit": False, "optimizer": "adamw_torch"},
    "on": {"HARNESS_FAST_TRAINING": "1", "quantize_4bit": False, "optimizer": "adamw_torch"},
    "qlora": {"HARNESS_FAST_TRAINING": "1", "quantize_4bit": True, "optimizer": "adamw_torch"},
    "qlora-adamw8": {"HARNESS_FAST_TRAINING": "1", "quantize_4bit": True, "optimizer": "adamw_bnb_8bit"},
}
LOSSES = ("train_loss", "train_loss_format", "train_loss_content")


class StepLog:
    """A run handle that keeps every step's metrics, the time they arrived, and the tags train_sft sets."""

    resumed = False  # a fresh run: nothing to resume

    def __init__(self):
        self.steps: list[tuple[float, int, dict]] = []
        self.tags: dict = {}

    def last_step(self, name):
        return None

    def log_metrics(self, metrics, step=0):
        if "train_loss" in metrics:
            self.steps.append((time.perf_counter(), step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)


def count_tokens(calls: list[int]) -> None:
    """Record the real tokens of every batch either collator builds (in order)."""
    for cls in (loss_classes.ClassCollator, fast_training.PackedClassCollator):
        original = cls.__call__

        def counted(self, features, _original=original):
            calls.append(sum(len(f["input_ids"]) for f in features))
            return _original(self, features)

        cls.__call__ = counted


def peaks(cuda: bool) -> tuple[float, float]:
    """(allocated, reserved) peaks in GiB since the last reset."""
    if not cuda:
        return 0.0, 0.0
    return round(torch.cuda.max_memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2)


def free_memory(cuda: bool) -> None:
    """Drop what the previous arm left (the model goes with its last reference) so each arm's peak is its own."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()


def save_random_weights(name: str, tokenizer, directory: Path) -> None:
    """An architecture's seeded random weights on disk, for `load_model` (4-bit loads quantise from files);
    written beside the directory and renamed, so a half-written one is never reused."""
    partial = directory.with_name(directory.name + ".partial")
    model, _ = load_bench_model(name)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)  # load_model requires the chat template in the model's directory
    del model
    partial.rename(directory)


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
    parser.add_argument("--arms", default="off,on", help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--weights-dir", default=None,
                        help="where an architecture's random weights are saved for 4-bit arms (reused if present)")
    parser.add_argument("--skip-steps", type=int, default=3, help="steps left out of the steady-state window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; arms are {', '.join(ARMS)}")

    cuda = torch.cuda.is_available()  # on CPU (a smoke test) the fast path stays off in every arm
    bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    for arm in arms:  # before anything is built or trained
        missing = four_bit_unavailable() if ARMS[arm]["quantize_4bit"] else None
        if missing is not None:
            sys.exit(f"arm {arm!r} loads the base in 4-bit NF4, which needs CUDA and bitsandbytes: {missing} here")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = build_task_rows(load_procedures(args.data_dir)[: args.rows], args.format)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch, grad_accum=args.grad_accum, max_length=args.max_length,
        learning_rate=args.learning_rate, gradient_checkpointing=args.gradient_checkpointing,
    )
    lengths = [len(loss_classes.tokenize_row(tokenizer, row, max_length=args.max_length)["input_ids"]) for row in rows]

    # Where each arm's model comes from: an architecture in memory, or a directory / spec through load_model.
    random_weights = args.model in ARCHITECTURES
    source = None if random_weights else args.model
    if random_weights and any(ARMS[arm]["quantize_4bit"] for arm in arms):
        weights_dir = Path(args.weights_dir or Path(tempfile.gettempdir()) / f"harness-bench-{args.model}")
        if not (weights_dir / "config.json").is_file():
            print(f"saving {args.model}'s random weights to {weights_dir}", flush=True)
            save_random_weights(args.model, tokenizer, weights_dir)
            free_memory(cuda)
        source = str(weights_dir)

    calls: list[int] = []
    count_tokens(calls)
    result = {
        "model": args.model, "random_weights": random_weights, "weights_source": source or "in memory (seeded)",
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "device_total_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "trl": __import__("trl").__version__, "peft": __import__("peft").__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__ if bitsandbytes else None,
        "data": f"wikihow procedures, {args.format} format", "rows": len(rows),
        "mean_tokens_per_row": round(sum(lengths) / len(lengths), 1), "max_tokens_per_row": max(lengths),
        "train_config": cfg.model_dump(mode="json"),
        "fast_path_batch_and_accumulation": fast_training.merge_accumulation(lengths, args.batch, args.grad_accum, args.max_length),
        "arms": {},
    }
    for arm in arms:
        settings = ARMS[arm]
        os.environ["HARNESS_FAST_TRAINING"] = settings["HARNESS_FAST_TRAINING"]
        arm_cfg = cfg.model_copy(update={"optimizer": settings["optimizer"], "quantize_4bit": settings["quantize_4bit"]})
        free_memory(cuda)
        if source is None:
            model, _ = load_bench_model(args.model)  # the same random weights every time (seeded)
        else:
            model, _ = load_model(source, quantize_4bit=settings["quantize_4bit"])
        load_peak, load_reserved = peaks(cuda)
        run, calls[:] = StepLog(), []
        free_memory(cuda)  # the training peak starts from the loaded weights
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            checkpoints = train_sft(model, tokenizer, rows, [], arm_cfg, seed=args.seed, output_dir=Path(out), run=run)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak, reserved = peaks(cuda)
        steps = run.steps
        per_step = len(calls) // len(steps)  # micro-batches a step (grad_accum; no evaluation here)
        skip = min(args.skip_steps, len(steps) - 2)
        window = steps[-1][0] - steps[skip - 1][0] if skip else steps[-1][0] - start
        window_tokens = sum(calls[skip * per_step :])
        result["arms"][arm] = {
            **settings, "gradient_checkpointing": cfg.gradient_checkpointing,
            "optimizer_tag": run.tags.get(Tag.OPTIMIZER.key),
            "steps": len(steps), "micro_batches_per_step": per_step,
            "checkpoints": len(checkpoints),
            "tokens": sum(calls), "end_to_end_s": round(seconds, 2),
            "end_to_end_tokens_per_second": round(sum(calls) / seconds, 1),
            "steady_steps": len(steps) - skip, "steady_s": round(window, 3),
            "steady_tokens_per_second": round(window_tokens / window, 1),
            "peak_memory_gib": peak, "peak_reserved_gib": reserved,
            "load_peak_memory_gib": load_peak, "load_peak_reserved_gib": load_reserved,
            "losses": {key: [s[2].get(key) for s in steps] for key in LOSSES},
        }
        print(json.dumps({"arm": arm, **{k: v for k, v in result["arms"][arm].items() if k != "losses"}}), flush=True)
        del model
        if args.json:
            write(result, args.json)
    free_memory(cuda)
    summarize(result)
    if args.json:
        write(result, args.json)
    print(json.dumps(result["summary"], indent=2))


def summarize(result: dict) -> None:
    """Ratios and loss differences against `off` (the path before); the QLoRA arms also against `on` (LoRA bf16),
    which is what the QLoRA issue compares them with."""
    arms = result["arms"]
    base, lora = arms.get("off"), arms.get("on")
    summary = {}
    for arm, r in arms.items():
        row = {"steady_tokens_per_second": r["steady_tokens_per_second"],
               "end_to_end_tokens_per_second": r["end_to_end_tokens_per_second"], "peak_memory_gib": r["peak_memory_gib"],
               "peak_reserved_gib": r["peak_reserved_gib"], "optimizer_tag": r["optimizer_tag"],
               "final_train_loss": r["losses"]["train_loss"][-1]}
        if base is not None and arm != "off":
            row["steady_ratio"] = round(r["steady_tokens_per_second"] / base["steady_tokens_per_second"], 2)
            row["end_to_end_ratio"] = round(r["end_to_end_tokens_per_second"] / base["end_to_end_tokens_per_second"], 2)
            for key in LOSSES:
                pairs = [(a, b) for a, b in zip(base["losses"][key], r["losses"][key]) if a is not None and b is not None]
                row[f"max_rel_diff_{key}"] = float(f"{max(abs(a - b) / abs(a) for a, b in pairs):.3g}") if pairs else None
        if lora is not None and r["quantize_4bit"]:
            row["vs_on_steady_ratio"] = round(r["steady_tokens_per_second"] / lora["steady_tokens_per_second"], 2)
            for key, name in (("peak_memory_gib", "vs_on_peak_ratio"), ("peak_reserved_gib", "vs_on_peak_reserved_ratio")):
                row[name] = round(r[key] / lora[key], 2) if lora[key] else None  # no peaks off CUDA
        summary[arm] = row
    result["summary"] = summary


def write(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
