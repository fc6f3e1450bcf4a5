"""Batched chat generation: the step every safety and task evaluation spends most of its time in.

Prompts are sorted by length before batching, so each batch pads little; outputs come back in the input
order. On CUDA, transformers and peft models of the Llama family take the fast path of
`harness.generation.fast` (continuous batching, static KV cache, CUDA graphs; several times faster, see
benchmarks/RESULTS.md); `runtime.fast_generation: false` (or `HARNESS_FAST_GENERATION=0`)
switches it off. Every other model and device goes
through plain `generate` in sorted batches. Decoding is exactly what the caller asks for: greedy at temperature 0, otherwise plain
temperature / top-p / min-p sampling, with the checkpoint's own defaults (top-k, repetition penalty)
switched off so that the logged decoding setting is the whole story.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from tqdm.auto import tqdm

from harness import faults, runtime
from harness.errors import HarnessError
from harness.generation.cache import CacheScope

Conversation = list[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


def generate_responses(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    cache: CacheScope | None = None,
    fault_point: str = "generation_batch",
) -> list[str]:
    """The assistant's reply to each conversation, in the input order.

    Plain path: sampling is seeded per batch (from `seed` and the batch's index), so a batch's outputs do
    not depend on how much randomness earlier batches consumed. Fast path (CUDA): one stream of
    randomness seeded from `seed`, and `batch_size` is not used (the slot count is sized from free memory).
    With `cache`, every finished batch (fast path: the whole call) is stored and a stored one is not
    generated again (see harness.generation.cache).
    """
    prompts = [_prompt_ids(tokenizer, conversation) for conversation in conversations]
    return generate_from_ids(model, tokenizer, prompts, temperature=temperature, top_p=top_p, min_p=min_p,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
                             desc=desc, cache=cache, fault_point=fault_point)


def generate_from_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    cache: CacheScope | None = None,
    fault_point: str = "generation_batch",
) -> list[str]:
    """`generate_responses` on prompts already templated and tokenized (`prompt_ids`): what the evaluation's
    request list (harness/generation/requests.py) hands the HF engine, so every engine sees the same token ids."""
    decoding = _decoding_options(tokenizer, temperature, top_p, min_p, max_new_tokens)
    if batch_size < 1:
        raise HarnessError(f"batch_size must be at least 1, got {batch_size}")
    if prompts and fast_path_unavailable(model) is None:
        key = cache.key(prompts, {**decoding, "path": "fast", "top_p": top_p, "min_p": min_p}, seed) if cache is not None else None
        cached = cache.cache.get(key, len(prompts)) if cache is not None else None
        if cached is not None:
            return cached
        texts = _generate_fast(model, tokenizer, prompts, decoding, temperature, top_p, min_p, seed, progress, desc)
        if cache is not None:
            cache.cache.put(key, texts)
        return texts
    # Longest first: a batch that does not fit in memory fails at once, not at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    responses = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for batch_index, start in enumerate(range(0, len(order), batch_size)):
            members = order[start : start + batch_size]
            batch, batch_seed = [prompts[i] for i in members], _seed(seed, batch_index)
            key = cache.key(batch, decoding, batch_seed) if cache is not None else None
            texts = cache.cache.get(key, len(batch)) if cache is not None else None
            if texts is None:
                texts = _generate_batch_fitting(model, tokenizer, batch, decoding, batch_seed)
                if cache is not None:
                    cache.cache.put(key, texts)
                    faults.reached(fault_point)
            for i, text in zip(members, texts):
                responses[i] = text
            bar.update(len(members))
    return responses


def _generate_batch_fitting(model: Any, tokenizer: Any, prompts: list[list[int]], decoding: dict[str, Any],
                            seed: int) -> list[str]:
    """`_generate_batch`, split in halves on CUDA out-of-memory until it fits (one prompt that does not is an error).

    Greedy outputs do not depend on the split beyond float noise; sampled ones are reseeded per half, so a
    retried batch is reproducible but not the same draw as an unsplit one: the split is printed.
    """
    try:
        return _generate_batch(model, tokenizer, prompts, decoding, seed)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise HarnessError("CUDA out of memory generating a single prompt: lower max_new_tokens or use a smaller model") from None
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        tqdm.write(f"CUDA out of memory on a batch of {len(prompts)}; retrying as {half} + {len(prompts) - half}")
        return (_generate_batch_fitting(model, tokenizer, prompts[:half], decoding, seed)
                + _generate_batch_fitting(model, tokenizer, prompts[half:], decoding, _seed(seed, 1)))


def generate_one_by_one(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating one by one",
) -> list[str]:
    """The unbatched reference for the benchmark: one prompt per `generate` call, no padding.

    `batch_size` is accepted and ignored so both paths take the same arguments.
    """
    decoding = _decoding_options(tokenizer, temperature, top_p, min_p, max_new_tokens)
    responses = []
    for index, conversation in enumerate(tqdm(conversations, desc=desc, unit="prompt", disable=not progress)):
        prompt = _prompt_ids(tokenizer, conversation)
        responses += _generate_batch(model, tokenizer, [prompt], decoding, _seed(seed, index))
    return responses


def fast_path_unavailable(model: Any) -> str | None:
    """Why `generate_responses` would not take the fast path for `model`; None when it would."""
    off = runtime.current().switched_off("fast_generation")  # runtime.fast_generation / HARNESS_FAST_GENERATION
    if off is not None:
        return off
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is None or parameter.device.type != "cuda":
        return "not on CUDA"
    from harness.generation.fast import unsupported_reason

    return unsupported_reason(model)


def _generate_fast(
    model: Any, tokenizer: Any, prompts: list[list[int]], decoding: dict[str, Any],
    temperature: float, top_p: float, min_p: float | None, seed: int, progress: bool, desc: str,
) -> list[str]:
    from harness.generation.fast import Sampling, fast_generate

    torch.manual_seed(_seed(seed, 0))
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        generated = fast_generate(
            model, prompts, max_new_tokens=decoding["max_new_tokens"], sampling=Sampling(temperature, top_p, min_p),
            pad_token_id=decoding["pad_token_id"], progress=bar.update,
        )
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def _decoding_options(
    tokenizer: Any, temperature: float, top_p: float, min_p: float | None, max_new_tokens: int
) -> dict[str, Any]:
    """`generate` arguments; sampling knobs are left out when greedy, where transformers warns about them."""
    if temperature < 0:
        raise HarnessError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise HarnessError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise HarnessError(f"min_p must be in [0, 1], got {min_p}")
    if max_new_tokens < 1:
        raise HarnessError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        # Padding is masked out, so any token will do when the tokenizer names none.
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "repetition_penalty": 1.0,  # some checkpoints default to e.g. 1.05 in generation_config.json
    }
    if temperature == 0:
        options["do_sample"] = False
    else:
        # top_k=0 switches off transformers' default top-k of 50, which would silently truncate sampling.
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if min_p is not None:
            options["min_p"] = min_p
    return options


def prompt_text(tokenizer: Any, conversation: Conversation) -> str:
    """The conversation as the model reads it: its chat template, ending where the assistant's reply begins."""
    if not tokenizer.chat_template:
        raise HarnessError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a templated prompt. The template already writes any BOS it wants; adding special tokens
    again would double it."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    return prompt_ids(tokenizer, prompt_text(tokenizer, conversation))


def _seed(seed: int, index: int | str) -> int:
    """A seed per batch (or per request: harness/generation/requests.py); hashing keeps (seed=0, batch 1) and
    (seed=1, batch 0) apart."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "big") >> 1


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], decoding: dict[str, Any], seed: int
) -> list[str]:
    width = max(len(ids) for ids in prompts)
    # Left padding: every prompt ends at column `width`, so the new tokens of every row start there.
    input_ids = torch.full((len(prompts), width), decoding["pad_token_id"], dtype=torch.long)  # (batch, width)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **decoding
        )  # (batch, width + new tokens); rows that stopped early are padded
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [text.strip() for text in texts]
