"""One model state's missing generations as a flat list of requests, and the replies back onto them.

Why a list of requests: the evaluation plans generations as (benchmark × decoding × repeat) records
(harness/evals/state.py), but `generate` wants prompts. Building the list in one pure place keeps the token ids,
sampling settings and seeds in one spot, and the mapping back (which reply belongs to which record, in which
order) is written once and unit-tested without a model.

A planned generation is anything with `config_hash`, `prompts` (user turns), `decoding` (temperature, top_p,
min_p, max_new_tokens), `seed` (eval.seed + repeat), `decoding_index`, `repeat`, `suffix` and `benchmark.name`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError
from harness.generation.batched import prompt_ids, prompt_text


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate a reply for, with everything that decides the reply."""

    prompt: str
    """The user turn after the chat template, ending where the assistant's reply begins."""
    prompt_ids: tuple[int, ...]
    """`prompt` tokenized without added special tokens (the template writes its own BOS): what engines are fed."""
    temperature: float
    top_p: float
    min_p: float | None
    max_new_tokens: int
    seed: int
    """The generation's seed (eval.seed + repeat): the HF engine seeds each batch from it, as it always has."""
    key: tuple[str, int]
    """(generation config hash, prompt index): where the reply goes back."""
    group: tuple[int, int]
    """(decoding index, repeat): the HF engine makes one `generate` call per group, as before requests existed."""
    label: str
    """The generation's run-name suffix (`T0`, `T0.7-r1`), for progress bars."""


def build_requests(generations: Sequence[Any], tokenizer: Any) -> list[GenerationRequest]:
    """Every prompt of `generations`, in their order and each one's prompt order (the order the state evaluator
    plans: decoding, repeat, benchmark)."""
    requests = []
    templated: dict[str, tuple[str, tuple[int, ...]]] = {}  # user turn -> (text, ids): benchmarks share prompts
    for generation in generations:
        decoding = generation.decoding
        for index, turn in enumerate(generation.prompts):
            if turn not in templated:
                text = prompt_text(tokenizer, [{"role": "user", "content": turn}])
                templated[turn] = (text, tuple(prompt_ids(tokenizer, text)))
            text, ids = templated[turn]
            requests.append(GenerationRequest(
                prompt=text, prompt_ids=ids, temperature=decoding.temperature, top_p=decoding.top_p,
                min_p=decoding.min_p, max_new_tokens=decoding.max_new_tokens, seed=generation.seed,
                key=(generation.config_hash, index), group=(generation.decoding_index, generation.repeat),
                label=generation.suffix,
            ))
    return requests


def groups(requests: Sequence[GenerationRequest]) -> Iterator[list[GenerationRequest]]:
    """Consecutive runs of requests with the same `group`: one HF `generate` call each."""
    run: list[GenerationRequest] = []
    for request in requests:
        if run and request.group != run[0].group:
            yield run
            run = []
        run.append(request)
    if run:
        yield run


def assign_results(generations: Sequence[Any], requests: Sequence[GenerationRequest],
                   texts: Sequence[str]) -> dict[str, list[str]]:
    """Generation config hash -> its replies in prompt order, for every generation some request belongs to; a
    reply count that does not match, or a generation left with a hole, is an error (never a silently shifted reply)."""
    if len(texts) != len(requests):
        raise HarnessError(f"the engine returned {len(texts)} replies for {len(requests)} requests")
    sizes = {generation.config_hash: len(generation.prompts) for generation in generations}
    replies: dict[str, list[str | None]] = {}
    for request, text in zip(requests, texts):
        digest, index = request.key
        if digest not in sizes:
            raise HarnessError(f"a reply belongs to generation {digest}, which was not asked for")
        replies.setdefault(digest, [None] * sizes[digest])[index] = text
    for digest, row in replies.items():
        if any(text is None for text in row):
            raise HarnessError(f"generation {digest} got {sum(t is not None for t in row)} of {len(row)} replies")
    return replies  # type: ignore[return-value]  (no None left)
