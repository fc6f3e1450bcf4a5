"""Fast evaluation generation: continuous batching over a static KV cache, one CUDA graph per decode step.

Why plain `generate` is slow here: at batch 256 each decode step is mostly Python and kernel launches
(every layer, eagerly), and a batch runs until its longest reply ends, so on a realistic mix (short
refusals, long compliances) most rows are finished padding by the end. This engine fixes both:

- `slots` sequences decode together; when one ends, the next prompt is prefilled into its slot
  (continuous batching), so the batch stays full until the queue is empty;
- each layer's KV cache is one preallocated tensor `[slots, kv_heads, ring, head_dim]`. Every step writes
  one column, shared by all slots, that advances by one per step (mod `ring`); a slot attends only to the
  columns of its own sequence (a boolean mask). Shapes never change, so one decode step is captured once
  as a CUDA graph and replayed;
- when the queue is empty and few slots are busy, the busy ones are moved to the front and a narrower
  graph takes over, so the tail of a run does not pay for idle slots.

Prefill runs the model's own forward (the code plain `generate` runs, left-padded, positions from the
mask); decode calls the model's own modules (norms, projections, rotary embedding, MLP), so peft LoRA
layers are applied as they are. Only the attention over the cache is written here. Greedy outputs
therefore match plain `generate` up to floating-point differences between attention kernels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Decoder layers that are exactly Llama's (pre-norm attention + gated MLP, rotary, GQA, no sliding window).
SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}
DEFAULT_SLOTS = 1024  # best measured on the H100 (1B: 1024; 8B: memory caps it at 512); see benchmarks/RESULTS.md
CHUNK_STEPS = 8  # decode steps between two looks from the host: finished rows run on for < 8 steps
PREFILL_TOKENS = 16384  # tokens per prefill forward: bounds its activation memory
KV_MEMORY_FRACTION = 0.5  # of the free GPU memory, at most, for the KV cache

# Where the last call's time went (seconds and counts), for `harness bench`'s profile column.
last_profile: dict[str, float] = {}


@dataclass(frozen=True)
class Sampling:
    """The decoding setting: greedy at temperature 0, else temperature → top-p → min-p, as transformers orders them."""

    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot take the fast path, or None when it can (a transformers or peft causal LM on CUDA)."""
    try:
        from peft import PeftModel
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - both are dependencies
        return "transformers/peft not importable"
    if not isinstance(model, (PreTrainedModel, PeftModel)):
        return f"{type(model).__name__} is not a transformers or peft model"
    base = _base(model)
    config = base.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "quantization_config", None) is not None:
        return "quantized weights"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or (
        config.model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention"
    body = getattr(base, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "not a decoder with .model.layers and .model.rotary_emb"
    return None


def fast_generate(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int | list[int],
    sampling: Sampling = Sampling(),
    eos_token_ids: list[int] | None = None,
    pad_token_id: int = 0,
    slots: int | None = None,
    use_cuda_graphs: bool | None = None,
    progress: Any = None,
) -> list[list[int]]:
    """Generated token ids for each prompt (ending with the EOS token when one was produced), in input order.

    `max_new_tokens` may be one number or one per prompt (the benchmark uses that to make replies stop at
    lengths drawn from a realistic mix). `eos_token_ids=None` takes the model's generation config, like
    plain `generate`. `slots` defaults to DEFAULT_SLOTS, fewer when the prompts or memory call for it.
    `progress`, if given, is called with the number of prompts just finished. Seed torch before calling
    for reproducible sampling. CUDA graphs are used on CUDA unless `use_cuda_graphs=False`; on CPU the same
    loop runs eagerly (that is what the CPU tests check).
    """
    if not prompts:
        return []
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or min(limits) < 1:
        raise ValueError("max_new_tokens must be >= 1, one number or one per prompt")
    if eos_token_ids is None:
        eos = _base(model).generation_config.eos_token_id
        eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    device = _base(model).model.embed_tokens.weight.device
    graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
    ring = _round_up(max(len(p) for p in prompts) + max(limits) + 1, 16)  # every step reads all of it: keep it tight
    width = _slot_count(model, len(prompts), ring, slots, device)
    with torch.inference_mode():
        start = time.perf_counter()
        engine = _Engine(model, width, ring, sampling, pad_token_id, graphs)
        engine.profile["setup_s"] = time.perf_counter() - start
        outputs = engine.run(prompts, limits, set(eos_token_ids), progress)
    last_profile.clear()
    last_profile.update({k: round(v, 3) for k, v in engine.profile.items()}, slots=width, ring=ring)
    return outputs


# ---------------------------------------------------------------------------------------------------


def _base(model: Any) -> Any:
    """The transformers CausalLM under a peft wrapper (whose LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _kv_bytes_per_slot(config: Any, ring: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * config.num_key_value_heads * ring * head_dim * element


def _slot_count(model: Any, n_prompts: int, ring: int, slots: int | None, device: torch.device) -> int:
    """Requested slots (default DEFAULT_SLOTS), no more than the prompts need, no more than the memory allows."""
    width = slots or DEFAULT_SLOTS
    width = min(width, 1 << math.ceil(math.log2(max(n_prompts, 1))))  # a power of two covering the prompts
    if device.type == "cuda":
        base = _base(model)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch: reusable
        per_slot = _kv_bytes_per_slot(base.config, ring, base.model.embed_tokens.weight.dtype)
        while width > 1 and width * per_slot > KV_MEMORY_FRACTION * free:
            width //= 2
    return max(width, 1)


class _Engine:
    """One generation call's state: the ring KV cache, per-slot bookkeeping and the captured decode graphs."""

    def __init__(self, model: Any, slots: int, ring: int, sampling: Sampling, pad_token_id: int, graphs: bool):
        self.lm = _base(model)
        self.body = self.lm.model
        config = self.lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.body.embed_tokens.weight
        self.device, dtype = weight.device, weight.dtype
        self.slots, self.ring, self.sampling, self.pad = slots, ring, sampling, pad_token_id
        shape = (slots, self.kv_heads, ring, self.head_dim)
        n_layers = len(self.body.layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        # Device-side state the decode graph reads and advances in place.
        self.valid = torch.zeros(slots, ring, dtype=torch.bool, device=self.device)  # columns each slot attends to
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # next input token per slot
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # its rotary position
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)  # where this step writes K/V
        self.history = torch.zeros(CHUNK_STEPS, slots, dtype=torch.long, device=self.device)  # tokens of a chunk
        self.step_in_chunk = torch.zeros(1, dtype=torch.long, device=self.device)
        self.column_host = 0  # the host's copy of `column`
        self.widths = [slots] + [w for w in (2**i for i in range(12, 3, -1)) if w < slots]  # slots, then 2^k ≥ 16
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.profile = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_calls": 0, "decode_steps": 0, "slot_steps": 0}
        if graphs:
            self._capture()

    # -- the decode step ---------------------------------------------------------------------------

    def _decode_step(self, width: int) -> None:
        """One token for each of the first `width` slots; reads and advances only device state (graph-safe)."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        valid = self.valid[:width]
        valid.index_fill_(1, self.column, True)  # the token written this step attends to itself
        mask = valid[:, None, None, :]  # (width, 1, 1, ring)
        x = self.body.embed_tokens(self.tokens[:width, None])  # (width, 1, hidden)
        cos, sin = self.body.rotary_emb(x, self.positions[:width, None])
        for i, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(width, 1, heads, head_dim).transpose(1, 2)  # (width, heads, 1, head_dim)
            k = attn.k_proj(h).view(width, 1, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(width, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = _apply_rotary(q, k, cos, sin)
            keys, values = self.keys[i][:width], self.values[i][:width]
            keys.index_copy_(2, self.column, k)
            values.index_copy_(2, self.column, v)
            # Query heads that share a KV head become that head's "query positions": no repeat of the cache.
            q = q.reshape(width, kv_heads, heads // kv_heads, head_dim)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            x = x + attn.o_proj(o.reshape(width, 1, heads * head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm.lm_head(self.body.norm(x)[:, -1]).float()  # (width, vocab)
        chosen = select_tokens(logits, self.sampling)
        self.tokens[:width].copy_(chosen)
        self.positions[:width].add_(1)
        self.history[:, :width].index_copy_(0, self.step_in_chunk, chosen[None])
        self.step_in_chunk.add_(1)
        self.column.add_(1).remainder_(self.ring)

    def _capture(self) -> None:
        """Capture one decode-step graph per width, on a blank state (warm-up steps write garbage we then clear)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for width in self.widths:  # warm-up: cuBLAS handles, allocator, lazy initialisations
                self.step_in_chunk.zero_()
                self._decode_step(width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for width in self.widths:  # widest first, so narrower graphs reuse its pool memory
            graph = torch.cuda.CUDAGraph()
            self.step_in_chunk.zero_()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_step(width)
            self.graphs[width] = graph
        torch.cuda.synchronize(self.device)
        for tensor in (self.valid, self.tokens, self.positions, self.column, self.history, self.step_in_chunk):
            tensor.zero_()

    def _decode_chunk(self, width: int) -> np.ndarray:
        """CHUNK_STEPS decode steps; the tokens they chose, (CHUNK_STEPS, width), on the host."""
        start = time.perf_counter()
        self.step_in_chunk.zero_()
        graph = self.graphs.get(width)
        for _ in range(CHUNK_STEPS):
            graph.replay() if graph is not None else self._decode_step(width)
        self.column_host = (self.column_host + CHUNK_STEPS) % self.ring
        chosen = self.history[:, :width].cpu().numpy()
        self.profile["decode_s"] += time.perf_counter() - start
        self.profile["decode_steps"] += CHUNK_STEPS
        self.profile["slot_steps"] += CHUNK_STEPS * width
        return chosen

    # -- prefill and bookkeeping -------------------------------------------------------------------

    def _prefill(self, slot_ids: list[int], prompts: list[list[int]]) -> list[int]:
        """Run the prompts through the model's forward, place their K/V in the slots, return each first token.

        The prompts are left-padded to a common width W and written to the W columns just before the
        next decode column, so every prompt ends where its first generated token will be written.
        """
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # as plain generate derives them from the mask
        out = self.lm(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
        columns = (torch.arange(width, device=self.device) + self.column_host - width) % self.ring  # (W,)
        rows = torch.tensor(slot_ids, device=self.device)
        real = attention.bool()[:, None, :, None]  # (n, 1, W, 1): padding columns are stored as zeros
        for i, layer in enumerate(out.past_key_values.layers):
            # Index (rows, columns) broadcast to (n, W) and come first: the target is (n, W, kv_heads, head_dim).
            self.keys[i][rows[:, None], :, columns[None, :]] = torch.where(real, layer.keys, 0).transpose(1, 2)
            self.values[i][rows[:, None], :, columns[None, :]] = torch.where(real, layer.values, 0).transpose(1, 2)
        self.valid[rows] = False
        self.valid[rows[:, None], columns[None, :]] = attention.bool()
        first = select_tokens(out.logits[:, -1].float(), self.sampling)
        self.tokens[rows] = first
        self.positions[rows] = attention.sum(-1)
        return first.tolist()

    def _compact(self, busy: list[int], width: int) -> None:
        """Move the busy slots to the front [0, len(busy)), so a graph of `width` covers them."""
        source = torch.tensor(busy, device=self.device)
        for cache in (*self.keys, *self.values, self.valid, self.tokens, self.positions):
            cache[: len(busy)] = cache[source]  # advanced indexing copies first, so overlaps are safe

    def run(self, prompts: list[list[int]], limits: list[int], eos: set[int], progress: Any) -> list[list[int]]:
        queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # similar lengths prefill together
        outputs: list[list[int]] = [[] for _ in prompts]
        owner: list[int | None] = [None] * self.slots  # which prompt each slot is generating for
        width = self.slots

        def finish(slot: int) -> None:
            owner[slot] = None
            if progress is not None:
                progress(1)

        def accept(slot: int, tokens: np.ndarray | list[int]) -> None:
            """Append a slot's new tokens up to its limit or EOS; free the slot when its reply is complete."""
            request = owner[slot]
            out = outputs[request]
            room = limits[request] - len(out)
            tokens = [int(t) for t in tokens[:room]]
            for n, token in enumerate(tokens):
                if token in eos:
                    out.extend(tokens[: n + 1])
                    return finish(slot)
            out.extend(tokens)
            if len(out) >= limits[request]:
                finish(slot)

        while queue or any(o is not None for o in owner[:width]):
            free = [s for s in range(width) if owner[s] is None]
            busy = width - len(free)
            if queue and (len(free) >= max(1, width // 16) or busy == 0):
                self._fill(free, queue, prompts, owner, accept)
            busy_slots = [s for s in range(width) if owner[s] is not None]
            if not queue:  # the tail: move the busy slots to the front and decode with a narrower graph
                narrower = min(w for w in self.widths if w >= len(busy_slots)) if busy_slots else width
                if narrower < width:
                    self._compact(busy_slots, narrower)
                    requests = [owner[s] for s in busy_slots]
                    owner[:] = requests + [None] * (self.slots - len(requests))
                    busy_slots, width = list(range(len(requests))), narrower
            if not busy_slots:
                continue
            chosen = self._decode_chunk(width)  # (CHUNK_STEPS, width)
            for slot in busy_slots:
                accept(slot, chosen[:, slot])
        return outputs

    def _fill(self, free: list[int], queue: list[int], prompts, owner, accept) -> None:
        """Prefill queued prompts into free slots, in forwards of at most PREFILL_TOKENS tokens."""
        started = time.perf_counter()
        taken = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
        slots = free[: len(taken)]
        start = 0
        while start < len(taken):
            width = len(prompts[taken[start]])  # longest first: this group's padded width
            count = max(1, min(len(taken) - start, PREFILL_TOKENS // width))
            group, group_slots = taken[start : start + count], slots[start : start + count]
            firsts = self._prefill(group_slots, [prompts[i] for i in group])
            for slot, request, first in zip(group_slots, group, firsts):
                owner[slot] = request
                accept(slot, [first])
            start += count
            self.profile["prefill_calls"] += 1
        self.profile["prefill_s"] += time.perf_counter() - started


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def select_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next token per row from float32 logits (rows, vocab); graph-safe (no host sync, no data-dependent shapes).

    Sampling draws by the exponential race, argmax(p / E) with E ~ Exp(1), which picks token i with
    probability p_i: the same distribution as `torch.multinomial`, without its host synchronisation.
    """
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        # transformers' TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p.
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - sampling.top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(-1)
    if sampling.min_p is not None:
        # transformers' MinPLogitsWarper: drop tokens less likely than min_p times the most likely one.
        probs = probs.masked_fill(probs < sampling.min_p * probs.amax(-1, keepdim=True), 0.0)
    race = torch.empty_like(probs).exponential_().clamp_min_(1e-30)
    return (probs / race).argmax(-1)
