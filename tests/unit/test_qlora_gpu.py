"""QLoRA and 8-bit AdamW as Study B and Study A ran them (issue 24): bitsandbytes on a CUDA GPU.

Marked `gpu`: CI has neither CUDA nor bitsandbytes, so these are skipped there and run on the GPU machine
(`scripts/gpu-qlora.sh`, with HARNESS_GPU_TEST_MODEL naming a staged model). What CI keeps are the CPU answers:
`quantize_4bit` refused on a CPU (test_models.py) and 8-bit AdamW's fallback tag (test_resume_units.py).
"""

import glob
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import of_kind, run_study, tag

MODEL = os.environ.get("HARNESS_GPU_TEST_MODEL", "smollm2-135m-instruct")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]


def tensor_dtypes(value):
    """Every tensor's dtype in a nested optimizer state (dicts, lists)."""
    if torch.is_tensor(value):
        yield value.dtype
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensor_dtypes(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensor_dtypes(item)


def test_the_model_loader_gives_nf4_weights_with_double_quantisation_and_bf16_compute():
    import bitsandbytes as bnb

    from harness.generation.fast import unsupported_reason
    from harness.models import load_model, weights_description

    model, tokenizer = load_model(MODEL, quantize_4bit=True)
    linears = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert linears, "no linear layer was quantised"
    weight = linears[0].weight
    assert weight.quant_type == "nf4" and weight.quant_state.nested, "not NF4 with double quantisation"
    assert linears[0].compute_dtype == torch.bfloat16
    assert weights_description(model) == (
        f"nf4 (bitsandbytes {bnb.__version__}, double quantisation, compute bfloat16)")
    assert unsupported_reason(model) == "quantized weights"  # generation takes HF's plain path
    # A quarter of the bytes, give or take the embeddings and norms that stay bf16.
    bf16, _ = load_model(MODEL)
    assert model.get_memory_footprint() < 0.6 * bf16.get_memory_footprint()


def test_qlora_sft_with_8bit_adamw_through_harness_run(tmp_path, monkeypatch):
    """`harness run` with train.quantize_4bit and train.optimizer adamw_bnb_8bit: the fine-tune trains on the 4-bit
    base with bitsandbytes' 8-bit AdamW (its optimizer state is uint8), the checkpoint is evaluated with the adapter
    on the 4-bit base (never merged), and every run says which weights it came from."""
    study = {
        "name": "qlora_gpu", "model": MODEL, "seeds": [0], "output_dir": str(tmp_path / "outputs"),
        "data": {"formats": ["json"], "train_size": 32, "val_size": 0, "test_size": 4,
                 "harmful": {"sources": {"advbench": 8}}},
        "train": {"methods": ["sft"], "quantize_4bit": True, "optimizer": "adamw_bnb_8bit", "epochs": 1,
                  "batch_size": 4, "grad_accum": 2, "max_length": 512, "learning_rate": 2.0e-4},
        "eval": {"engine": "auto", "batch_size": 16, "decoding": [{"temperature": 0, "max_new_tokens": 32}],
                 "judges": [{"name": "keyword"}], "xstest": None},
    }
    monkeypatch.delenv("HARNESS_FAST_GENERATION", raising=False)  # the tag must name the model's reason
    _, client, runs = run_study(tmp_path, study)
    [finetune] = of_kind(runs, "finetune")
    nf4 = tag(finetune, "base_weights")
    assert nf4.startswith("nf4 (bitsandbytes ") and "double quantisation, compute bfloat16" in nf4
    assert tag(finetune, "optimizer") == "adamw_bnb_8bit"
    assert tag(finetune, "adapter_dtype") == "float32"  # not TRL's bfloat16 for 4-bit bases
    assert finetune.data.params["train.quantize_4bit"] == "True"
    losses = [point.value for point in client.get_metric_history(finetune.info.run_id, "train_loss")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)  # 32 rows / (4 x 2) a step
    assert finetune.data.metrics["peak_gpu_memory_gib"] > 0 and finetune.data.metrics["train_tokens_per_second"] > 0

    # 8-bit AdamW really ran: bitsandbytes keeps its moments as uint8 in the optimizer state the Trainer saved
    # (bitsandbytes 0.50 nests each parameter's state under "__bnb_optimizer_quant_state__").
    [saved] = glob.glob(str(Path(tag(finetune, "output_dir")) / "checkpoint-*" / "optimizer.pt"))
    state = torch.load(saved, map_location="cpu", weights_only=False)["state"]
    assert state, "the saved optimizer has no state"
    dtypes = set(tensor_dtypes(state))
    assert torch.uint8 in dtypes, f"optimizer state dtypes {dtypes}: not 8-bit AdamW"

    from safetensors.torch import load_file

    [adapter] = glob.glob(str(Path(tag(finetune, "output_dir")) / "checkpoint-*" / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in load_file(adapter).values()} == {torch.float32}

    checkpoints = of_kind(runs, "checkpoint")
    [trained] = [run for run in checkpoints if tag(run, "method") == "sft"]
    assert tag(trained, "adapter_merged") == "False"  # a 4-bit base is never merged
    [base] = [run for run in checkpoints if tag(run, "method") == "base"]
    assert base.data.params["quantize_4bit"] == "True"  # the 4-bit base is its own unit, not the bf16 base's
    generations = of_kind(runs, "generation")
    assert generations and all(tag(run, "engine") == "hf" for run in generations)  # auto keeps 4-bit on HF
    assert all(tag(run, "base_weights") == nf4 for run in generations)
    assert all(tag(run, "fast_generation") == "off: quantized weights" for run in generations)
    asr = [run.data.metrics["asr"] for run in of_kind(runs, "evaluation") if "asr" in run.data.metrics]
    assert asr and all(0 <= value <= 1 for value in asr)
