"""Which engine generates the evaluated model's replies (`eval.engine`), and how each runs a state's requests.

Two engines, one request list (harness/generation/requests.py):
- `hf`: transformers `generate` (its CUDA fast path where it applies) on the model with the checkpoint's adapter,
  one call per (decoding, repeat) group, batched and seeded exactly as the evaluation always did;
- `vllm`: one running vLLM engine per study (harness/generation/vllm_engine.py) holding the base weights; for a
  fine-tuned state the adapter is merged into the weights and loaded into it, every request of the state is
  generated in one call, and the base weights are put back.

Why one engine per evaluation step, recorded: two engines sample differently (and differ in float noise even when
greedy), so the engine is part of each generation's identity and its `harness.engine` tag; responses of two
engines are never compared as if they were one. `auto` takes vLLM only where it can run (CUDA, the `vllm`
extra); CPU, CI and the quickstart stay on HF.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from harness.errors import HarnessError
from harness.generation.batched import generate_from_ids
from harness.generation.requests import GenerationRequest, groups

ENGINES = ("hf", "vllm")


class WeightLoadingEngine(Protocol):
    """What the evaluation asks of an engine that holds one set of weights (VLLMEngine, or a test's stand-in)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]: ...

    def load_weights(self, named_tensors: Any) -> None: ...

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
    one-line error naming eval.engine. A 4-bit base (train.quantize_4bit) stays on HF: its adapters cannot be
    merged into the weights vLLM holds."""
    if setting == "hf":
        return "hf"
    if setting not in ("vllm", "auto"):
        raise HarnessError(f"eval.engine: {setting!r} is not one of hf, vllm, auto")
    reason = vllm_unavailable()
    if reason is None and quantized:
        reason = "train.quantize_4bit is on (a 4-bit model's adapters cannot be merged into vLLM's weights)"
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


def generate_loaded(engine: WeightLoadingEngine, requests: Sequence[GenerationRequest], weights: Any,
                    restore: Callable[[], Any] | None) -> list[str]:
    """A weight-loading engine on one model state: load `weights` (None: the base weights the engine holds), generate
    every request in one call, and load `restore()` (the base weights) again afterwards, also when generating fails,
    so the next state starts from the base."""
    try:
        if weights is not None:
            engine.load_weights(weights)
        return list(engine.generate(list(requests)))
    finally:
        if weights is not None and restore is not None:
            engine.load_weights(restore())


def engine_cache_key(cache: Any, requests: Sequence[GenerationRequest], engine: str) -> str:
    """The generation cache's key for one generation's replies from a weight-loading engine: the model state (the
    scope), every prompt's ids, the sampling settings, each request's seed, and the engine. (HF entries are keyed per
    batch by `generate_from_ids` and carry no engine field, so existing HF caches stay valid and never collide.)"""
    first = requests[0]
    decoding = {"engine": engine, "temperature": first.temperature, "top_p": first.top_p, "min_p": first.min_p,
                "max_new_tokens": first.max_new_tokens, "request_seeds": [request.request_seed for request in requests]}
    return cache.key([list(request.prompt_ids) for request in requests], decoding, first.seed)
