"""The vLLM engine (`eval.engine: vllm`): one running `vllm.LLM` per study's base model, fed merged weights per state.

Why weights and not vLLM's LoRA support: measured on the H200 (../shared/gpu/VLLM.md), vLLM's multi-LoRA kernels
halve its throughput, so serving the epoch checkpoints as adapters is no faster than the harness's own engine;
loading a checkpoint's merged weights into the running engine (`apply_model(load_weights)`, 0.03 s for an 8B
model, the way TRL's colocate mode does it) keeps vLLM's full speed. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tensors reach the model by reference, not through a pipe.

Sleep mode: between states the engine sleeps (level 1: weights to host memory, KV cache freed), so a fine-tune
that trains after an evaluation has the GPU; the next `generate` or `load_weights` wakes it.

vLLM is imported only when an engine is made: CPU machines and CI never import it. Everything here that does not
need vLLM (`sampling_settings`) is a plain function the CPU tests check.
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


def gpu_memory_utilization() -> float:
    """`HARNESS_VLLM_GPU_MEMORY` (a share in (0, 1]), else DEFAULT_GPU_MEMORY_UTILIZATION; a bad value is one line."""
    raw = os.environ.get(GPU_MEMORY_VARIABLE)
    if raw is None:
        return DEFAULT_GPU_MEMORY_UTILIZATION
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise HarnessError(f"{GPU_MEMORY_VARIABLE}={raw!r}: give the share of GPU memory vLLM may use, in (0, 1]")
    return value


class VLLMEngine:
    """A running vLLM engine on one base model: `generate(requests)`, `load_weights(named tensors)`, `restore_base()`,
    `sleep()`, `close()`."""

    def __init__(self, model_path: str | Path, *, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, max_model_len: int | None = None,
                 seed: int = 0, revision: str | None = None, **engine_args: Any):
        """`engine_args` go to `vllm.LLM` as they are (`harness bench` passes `load_format="dummy"` and
        `skip_tokenizer_init=True` for an architecture with random weights)."""
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
        except (torch.OutOfMemoryError, ValueError, RuntimeError) as error:
            if "memory" not in str(error).lower():
                raise
            raise self._memory_error(error) from None
        self.asleep = False

    def _memory_error(self, error: BaseException) -> HarnessError:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else "out of memory"
        return HarnessError(f"vLLM ran out of GPU memory with {self.gpu_memory_utilization:.0%} of it ({first}); lower "
                            f"{GPU_MEMORY_VARIABLE} (the share vLLM takes) if training or the judges need more, "
                            "raise it if vLLM itself needs more, or set eval.engine: hf")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Every request's reply, in the requests' order, from one `LLM.generate` call (fed token ids, so the prompt
        is exactly the HF path's)."""
        outputs = self._generate([list(request.prompt_ids) for request in requests],
                                 [sampling_settings(request) for request in requests])
        return [output.outputs[0].text.strip() for output in outputs]

    def generate_tokens(self, prompts: Sequence[Sequence[int]], settings: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Each prompt's new token ids under its `SamplingParams` arguments (`harness bench`: no text needed)."""
        return [list(output.outputs[0].token_ids) for output in self._generate(prompts, settings)]

    def _generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[dict[str, Any]]) -> list[Any]:
        import torch
        from vllm import SamplingParams

        self.wake()
        try:
            return self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts],
                                     [SamplingParams(**options) for options in settings], use_tqdm=True)
        except torch.OutOfMemoryError as error:
            raise self._memory_error(error) from None

    def load_weights(self, named_tensors: dict[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Copy HF-named tensors into the running model (vLLM's own `load_weights` maps names and fuses q/k/v and
        gate/up), then drop the prefix cache: KV computed under the old weights must not serve the new ones."""
        items = list(named_tensors.items()) if isinstance(named_tensors, dict) else list(named_tensors)
        self.wake()
        self.llm.apply_model(lambda model: model.load_weights(items))
        self.llm.reset_prefix_cache()

    def restore_base(self) -> None:
        """The base model's weights from its files again (for callers without an HF copy of the base in memory)."""
        from safetensors.torch import load_file

        folder = Path(self.model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(self.model_path, revision=self.revision, allow_patterns=["*.safetensors"]))
        for path in sorted(folder.glob("*.safetensors")):
            self.load_weights(load_file(str(path)))

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
    """The engine for a study's base model (`model:` resolved to its local directory or hub id)."""
    from harness.models import resolve_model

    source = resolve_model(cfg.model)
    return shared_engine(source.location, revision=source.revision, seed=cfg.eval.seed,
                         gpu_memory_utilization=gpu_memory_utilization())
