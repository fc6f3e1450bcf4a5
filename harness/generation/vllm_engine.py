"""The vLLM engine (`eval.engine: vllm`): one running `vllm.LLM` per study's base model, each checkpoint's adapter
served as a LoRA adapter of it.

Why served and not merged: the first design loaded each checkpoint's merged weights into the running engine
(`apply_model(load_weights)`, as TRL's colocate mode does). On the H200 that cost Study B's SFT states 0.10–0.17 of
keyword ASR against HF with the adapter (benchmarks/RESULTS.md, "vLLM"): in bfloat16 a paper-LR LoRA update is
mostly below the weights' rounding step, so merging rounds it away. A served adapter adds x·A·B beside x·W, as
PEFT does. `load_weights` stays for `harness bench` (random weights, no adapter).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Sleep mode: between states the engine sleeps
(level 1: weights to host memory, KV cache freed), so a fine-tune that trains after an evaluation has the GPU; the
next `generate` wakes it.

vLLM is imported only when an engine is made: CPU machines and CI never import it. Everything here that does not
need vLLM (`sampling_settings`, `lora_rank_limit`) is a plain function the CPU tests check.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.generation.requests import GenerationRequest

GPU_MEMORY_VARIABLE = "HARNESS_VLLM_GPU_MEMORY"
"""Environment variable: the share of the GPU's memory the vLLM engine may take (weights + KV cache)."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.5
"""Half the GPU: the HF copy of the base model (merges, ProMoT's soft-prompt path), the judges and training share it."""


def sampling_settings(request: GenerationRequest) -> dict[str, Any]:
    """`SamplingParams` arguments for one request: greedy at temperature 0 (no seed: nothing is drawn), else
    temperature -> top-p -> min-p with the request's own seed, so a sampled repeat is reproducible whatever else
    shares the call. top-k and the repetition penalty stay at vLLM's defaults (off), as the HF path switches off a
    checkpoint's own defaults: the logged decoding setting is the whole story."""
    settings: dict[str, Any] = {"max_tokens": request.max_new_tokens, "temperature": 0.0}
    if not request.greedy:
        settings.update(temperature=request.temperature, top_p=request.top_p, min_p=request.min_p or 0.0,
                        seed=request.request_seed)
    return settings


PROFILING_RACE = "Error in memory profiling"
"""How vLLM 0.26's start-up assertion begins when another process on the GPU frees memory while vLLM measures its
own (seen on the H200: benchmarks/h200-one/judge-server.log). Not a lack of memory: a start once the GPU is quiet
gets past it, so the engine says so and the judge server tries once more (judges/vllm_server.py)."""


def gpu_memory_share(variable: str, default: float, what: str = "vLLM") -> float:
    """A share of the GPU's memory from environment variable `variable` (in (0, 1]), else `default`; a bad value
    is one line naming the variable."""
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise HarnessError(f"{variable}={raw!r}: give the share of GPU memory {what} may use, in (0, 1]")
    return value


def gpu_memory_utilization() -> float:
    """`HARNESS_VLLM_GPU_MEMORY`, else DEFAULT_GPU_MEMORY_UTILIZATION."""
    return gpu_memory_share(GPU_MEMORY_VARIABLE, DEFAULT_GPU_MEMORY_UTILIZATION)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM's `max_lora_rank` accepts."""


def lora_rank_limit(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that serves adapters of `rank` (a one-line error above its largest)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise HarnessError(f"train.lora.r: {rank} is above the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]}); "
                       "set eval.engine: hf")


class VLLMEngine:
    """A running vLLM engine on one base model: `generate(requests, adapter)`, `load_weights(named tensors)`,
    `sleep()`, `close()`. With `max_lora_rank` it serves LoRA adapters up to that rank, one per call."""

    def __init__(self, model_path: str | Path, *, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, max_model_len: int | None = None,
                 seed: int = 0, revision: str | None = None, max_lora_rank: int | None = None, **engine_args: Any):
        """`engine_args` go to `vllm.LLM` as they are (`harness bench` passes `load_format="dummy"` and
        `skip_tokenizer_init=True` for an architecture with random weights)."""
        if max_lora_rank is not None:
            engine_args.update(enable_lora=True, max_lora_rank=lora_rank_limit(max_lora_rank))
            engine_args.setdefault("max_loras", 1)  # one state per call
        self.adapter_ids: dict[str, int] = {}
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: apply_model sees our tensors
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the sampler would import flashinfer (VLLM.md)
        import torch
        from vllm import LLM

        self.model_path, self.revision = str(model_path), revision
        self.gpu_memory_utilization = gpu_memory_utilization
        # vLLM checks that the share it is given is free now: memory PyTorch's allocator holds from training or from
        # the HF model's generation must go back to the device first.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.llm = LLM(model=self.model_path, revision=revision, dtype=dtype, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enable_sleep_mode=True, **engine_args)
        except (torch.OutOfMemoryError, ValueError, RuntimeError, AssertionError) as error:
            if "memory" not in str(error).lower():
                raise
            raise self._memory_error(error) from None
        self.asleep = False

    def _memory_error(self, error: BaseException) -> HarnessError:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else "out of memory"
        if PROFILING_RACE in first:
            return HarnessError(f"vLLM's start was upset by another process on this GPU freeing memory while vLLM "
                                f"measured its own ({first[:100]}); start it again once the GPU is quiet, or give "
                                "vLLM its GPU alone")
        return HarnessError(f"vLLM ran out of GPU memory with {self.gpu_memory_utilization:.0%} of it ({first}); lower "
                            f"{GPU_MEMORY_VARIABLE} (the share vLLM takes) if training or the judges need more, "
                            "raise it if vLLM itself needs more, or set eval.engine: hf")

    def generate(self, requests: Sequence[GenerationRequest], adapter: str | Path | None = None) -> list[str]:
        """Every request's reply, in the requests' order, from one `LLM.generate` call (fed token ids, so the prompt
        is exactly the HF path's), with the LoRA adapter in the directory `adapter` (None: the base model)."""
        outputs = self._generate([list(request.prompt_ids) for request in requests],
                                 [sampling_settings(request) for request in requests], self.lora_request(adapter))
        return [output.outputs[0].text.strip() for output in outputs]

    def lora_request(self, adapter: str | Path | None) -> Any:
        """vLLM's handle on an adapter directory: one integer id per directory and version of its files (vLLM caches
        adapters by id, so a directory is read once, and one rewritten since gets a new id)."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        version = [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(Path(path).glob("adapter_*"))]
        number = self.adapter_ids.setdefault(f"{path}|{version}", len(self.adapter_ids) + 1)
        return LoRARequest(f"adapter-{number}", number, path)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], settings: Sequence[dict[str, Any]],
                        adapter: str | Path | None = None) -> list[list[int]]:
        """Each prompt's new token ids under its `SamplingParams` arguments (`harness bench`: no text needed)."""
        outputs = self._generate(prompts, settings, self.lora_request(adapter))
        return [list(output.outputs[0].token_ids) for output in outputs]

    def _generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[dict[str, Any]],
                  lora_request: Any = None) -> list[Any]:
        import torch
        from vllm import SamplingParams

        self.wake()
        try:
            return self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts],
                                     [SamplingParams(**options) for options in settings], use_tqdm=True,
                                     lora_request=lora_request)
        except torch.OutOfMemoryError as error:
            raise self._memory_error(error) from None

    def load_weights(self, named_tensors: dict[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Copy HF-named tensors into the running model (vLLM's own `load_weights` maps names and fuses q/k/v and
        gate/up), then drop the prefix cache: KV computed under the old weights must not serve the new ones.
        (`harness bench`: the HF model's random weights; not for adapters, see the module's docstring.)"""
        items = list(named_tensors.items()) if isinstance(named_tensors, dict) else list(named_tensors)
        self.wake()
        self.llm.apply_model(lambda model: model.load_weights(items))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU for training or judges: weights to host memory, KV cache dropped (vLLM sleep level 1)."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back."""
        import torch

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_shared: dict[str, VLLMEngine] = {}


def shared_engine(model_path: str | Path, **settings: Any) -> VLLMEngine:
    """The process's one vLLM engine, made on first use and reused by every study runner (a sweep's trials too) on
    the same base model; asking for another model closes the old engine first (one engine fits on the GPU)."""
    key = f"{model_path}|{sorted(settings.items())}"
    if key not in _shared:
        for engine in _shared.values():
            engine.close()
        _shared.clear()
        _shared[key] = VLLMEngine(model_path, **settings)
    return _shared[key]


def engine_for(cfg: Any) -> VLLMEngine:
    """The engine for a study's base model (`model:` resolved to its local directory or hub id), serving adapters of
    the study's LoRA rank."""
    from harness import runtime
    from harness.models import resolve_model

    source = resolve_model(cfg.model)
    return shared_engine(source.location, revision=source.revision, seed=cfg.eval.seed,
                         gpu_memory_utilization=gpu_memory_utilization(), max_lora_rank=cfg.train.lora.r,
                         enforce_eager=runtime.current().vllm_eager)
