"""Which engine generates the evaluated model's replies (`eval.engine`), and how each runs a state's requests.

Two engines, one request list (harness/generation/requests.py):
- `hf`: transformers `generate` (its CUDA fast path where it applies) on the model with the checkpoint's adapter,
  one call per (decoding, repeat) group, batched and seeded exactly as the evaluation always did;
- `vllm`: one running vLLM engine per study (harness/generation/vllm_engine.py) on the base weights; a fine-tuned
  state's adapter is served as a LoRA adapter of that engine, and every request of the state is one call.

Why the adapter is served and not merged into the weights: merging a LoRA update into bfloat16 weights rounds most
of it away (a paper-LR update is far below bf16's 2^-8 relative step), and it measurably changed the results: on the
H200, Study B's SFT states scored keyword ASR 0.10–0.17 lower from merged weights than from the adapter
(benchmarks/RESULTS.md, "vLLM"). A served adapter computes x·A·B beside x·W, as PEFT does.

Why one engine per evaluation step, recorded: two engines sample differently (and differ in float noise even when
greedy), so the engine is part of each generation's identity and its `harness.engine` tag; responses of two
engines are never compared as if they were one. `auto` takes vLLM only where it can run (CUDA, the `vllm`
extra); CPU, CI and the quickstart stay on HF.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from harness.errors import HarnessError
from harness.generation.batched import generate_from_ids
from harness.generation.requests import GenerationRequest, groups

ENGINES = ("hf", "vllm")


class AdapterServingEngine(Protocol):
    """What the evaluation asks of an engine that holds the base model and serves adapters (VLLMEngine, or a test's
    stand-in): every request of one state in one call, with the state's adapter directory (None: the base)."""

    def generate(self, requests: Sequence[GenerationRequest], adapter: Path | None = None) -> list[str]: ...

    def sleep(self) -> None: ...


def vllm_unavailable() -> str | None:
    """Why vLLM cannot generate here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA device"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install -e '.[vllm]')"
    return None


def resolve_engine(setting: str, *, quantized: bool = False) -> str:
    """`eval.engine` -> 'hf' or 'vllm'. 'auto' is vllm only where it can run; an explicit 'vllm' that cannot is a
    one-line error naming eval.engine. A 4-bit base (train.quantize_4bit) stays on HF: its adapters were trained on
    4-bit weights, and vLLM would serve them on the bf16 ones."""
    if setting == "hf":
        return "hf"
    if setting not in ("vllm", "auto"):
        raise HarnessError(f"eval.engine: {setting!r} is not one of hf, vllm, auto")
    reason = vllm_unavailable()
    if reason is None and quantized:
        reason = "train.quantize_4bit is on (its adapters were trained on 4-bit weights; vLLM would serve them on bf16)"
    if reason is None:
        return "vllm"
    if setting == "auto":
        return "hf"
    raise HarnessError(f"eval.engine: vllm cannot run here: {reason}; set eval.engine to hf or auto")


def generate_hf(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest], *, batch_size: int,
                cache: Any = None) -> Iterator[tuple[list[GenerationRequest], list[str]]]:
    """The HF engine: per (decoding, repeat) group, in order, the group's requests and their replies. Each group is
    one `generate_from_ids` call over its prompts, seeded from the group's seed (batches by length, the fast path
    and the per-batch cache stay inside it), which is the call the evaluation made before requests existed."""
    for group in groups(requests):
        first = group[0]
        texts = generate_from_ids(
            model, tokenizer, [list(request.prompt_ids) for request in group], temperature=first.temperature,
            top_p=first.top_p, min_p=first.min_p, max_new_tokens=first.max_new_tokens, batch_size=batch_size,
            seed=first.seed, desc=f"generating ({first.label})", cache=cache,
        )
        yield group, texts


def engine_cache_key(cache: Any, requests: Sequence[GenerationRequest], engine: str) -> str:
    """The generation cache's key for one generation's replies from an adapter-serving engine: the model state (the
    scope), every prompt's ids, the sampling settings, each request's seed, and the engine. (HF entries are keyed per
    batch by `generate_from_ids` and carry no engine field, so existing HF caches stay valid and never collide.)"""
    first = requests[0]
    decoding = {"engine": engine, "temperature": first.temperature, "top_p": first.top_p, "min_p": first.min_p,
                "max_new_tokens": first.max_new_tokens, "request_seeds": [request.request_seed for request in requests]}
    return cache.key([list(request.prompt_ids) for request in requests], decoding, first.seed)
