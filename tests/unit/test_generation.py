"""Batched generation on the real SmolLM2-135M (loaded from the harness cache; see test_models.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import pytest

from harness.errors import HarnessError
from harness.generation.batched import generate_one_by_one, generate_responses
from harness.models import load_model

# One thread: two-thread generation stalls badly when anything else shares the two CPU cores (measured: this file
# took 94s on two threads and 71s on one beside one other busy process; once 457s on two), and the results are
# the same.
pytestmark = pytest.mark.usefixtures("one_thread")

# Lengths differ a lot on purpose, so sorting into batches really reorders them.
PROMPTS = [
    "Hi!",
    "Explain in detail, step by step, how photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "How do I pick a lock without the key? Please be thorough and list the tools I need.",
    "Name a colour.",
]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="module")
def greedy_one_by_one(smollm2):
    return generate_one_by_one(*smollm2, CONVERSATIONS, max_new_tokens=24, progress=False)


def test_batched_greedy_equals_one_by_one(smollm2, greedy_one_by_one):
    """Exact equality holds in float32: left padding is fully masked and positions come from the mask."""
    batched = generate_responses(*smollm2, CONVERSATIONS, max_new_tokens=24, batch_size=4, progress=False)
    assert batched == greedy_one_by_one


def test_outputs_come_back_in_input_order(smollm2, greedy_one_by_one):
    assert len(set(greedy_one_by_one)) == len(PROMPTS)  # distinct, so a mix-up would show
    reversed_batch = generate_responses(
        *smollm2, CONVERSATIONS[::-1], max_new_tokens=24, batch_size=len(PROMPTS), progress=False
    )
    assert reversed_batch == greedy_one_by_one[::-1]


def test_empty_input_gives_empty_output(smollm2):
    assert generate_responses(*smollm2, [], progress=False) == []


def test_sampling_is_reproducible_per_seed(smollm2):
    def sample(seed: int) -> list[str]:
        return generate_responses(
            *smollm2, CONVERSATIONS[:3], temperature=1.0, max_new_tokens=16, batch_size=2, seed=seed, progress=False
        )

    first = sample(seed=1)
    assert sample(seed=1) == first
    assert sample(seed=2) != first


def test_min_p_is_applied(smollm2, greedy_one_by_one):
    """min_p=1 keeps only the most likely token, so sampling must reproduce greedy decoding."""
    outputs = generate_responses(
        *smollm2, CONVERSATIONS, temperature=1.0, min_p=1.0, max_new_tokens=24, seed=3, progress=False
    )
    assert outputs == greedy_one_by_one


def test_top_p_is_applied(smollm2, greedy_one_by_one):
    outputs = generate_responses(
        *smollm2, CONVERSATIONS, temperature=1.0, top_p=1e-6, max_new_tokens=24, seed=4, progress=False
    )
    assert outputs == greedy_one_by_one


@pytest.mark.parametrize(
    "options, field",
    [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"min_p": 1.5}, "min_p"),
     ({"batch_size": 0}, "batch_size"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_bad_decoding_settings_name_the_field(smollm2, options, field):
    with pytest.raises(HarnessError, match=f"^{field} must"):
        generate_responses(*smollm2, CONVERSATIONS[:1], progress=False, **options)
