"""How the evaluated model's replies are generated: HF `generate` (its CUDA fast path, harness/generation/fast.py,
where it applies) on the model with the checkpoint's adapter, one call per (decoding, repeat) group of the flat
request list (harness/generation/requests.py), batched and seeded exactly as the evaluation always did.

Why there is no other engine: issue 22 built a vLLM engine serving each checkpoint's adapter on one running engine,
measured it on an H200 against this path, and removed it. It gave the same numbers (keyword ASR within 0.007 per
state) but no speed: on Study B's states at Study A's decodings (35,700 generations) both spent 183 s generating
and 43 s per state in all, and vLLM's engine start cost 125 s more (benchmarks/RESULTS.md, "Study-A-sized step").
Merging the adapter into bfloat16 weights instead (fast in vLLM) rounded a paper-LR update away and lowered SFT's
ASR by 0.10-0.17. A 4-bit (QLoRA) base, Study A's setting, could never use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from harness.generation.batched import generate_from_ids
from harness.generation.requests import GenerationRequest, groups

ENGINE = "hf"
"""The `harness.engine` tag of every generation run (kept in the schema: older stores hold vLLM's records too)."""


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
