"""The fast generation path (continuous batching over a ring KV cache) against plain `generate`.

On CPU the engine runs eagerly; on CUDA the same step is replayed as a CUDA graph (the CUDA tests are
skipped without a GPU). A tiny random Llama in float32 has no near-ties, so greedy outputs must agree
token for token.
"""

import random

import pytest
import torch

from harness.bench import load_bench_model, plain_generate
from harness.generation.fast import Sampling, fast_generate, unsupported_reason
from harness.generation.batched import fast_path_unavailable


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 512) for _ in range(rng.randint(2, 24))] for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return load_bench_model("tiny-llama", device="cpu")[0]


def test_greedy_equals_plain_generate_with_refills_and_compaction(tiny):
    """37 prompts through 16 slots: slots are refilled, then compacted to narrower widths at the tail."""
    prompts = _prompts(37)
    limits = [random.Random(i).randint(1, 30) for i in range(len(prompts))]
    plain = plain_generate(tiny, prompts, limits, "greedy", batch=8, pad=0, stop_on_eos=False)
    fast = fast_generate(tiny, prompts, max_new_tokens=limits, eos_token_ids=[], slots=16)
    assert [len(r) for r in fast] == limits
    assert fast == plain


def test_stops_at_eos_like_plain_generate(tiny):
    prompts = _prompts(12, seed=1)
    reference = fast_generate(tiny, prompts, max_new_tokens=20, eos_token_ids=[], slots=4)
    eos = reference[0][3]  # a token the model does produce, so some replies stop early
    tiny.generation_config.eos_token_id = eos
    try:
        plain = plain_generate(tiny, prompts, [20] * len(prompts), "greedy", batch=4, pad=0, stop_on_eos=True)
        fast = fast_generate(tiny, prompts, max_new_tokens=20, slots=4)  # EOS from the generation config
    finally:
        tiny.generation_config.eos_token_id = None
    assert fast == plain
    assert fast[0] == reference[0][: reference[0].index(eos) + 1]


def test_peft_lora_layers_are_applied(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_bench_model("tiny-llama", device="cpu")[0],
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    prompts = _prompts(6, seed=2)
    fast = fast_generate(model, prompts, max_new_tokens=12, eos_token_ids=[], slots=4)
    assert fast == plain_generate(model, prompts, [12] * 6, "greedy", batch=6, pad=0, stop_on_eos=False)
    assert fast != fast_generate(tiny, prompts, max_new_tokens=12, eos_token_ids=[], slots=4)


def test_sampling_is_seeded_and_filters_apply(tiny):
    prompts = _prompts(10, seed=3)

    def sample(seed: int, **kw) -> list[list[int]]:
        torch.manual_seed(seed)
        return fast_generate(tiny, prompts, max_new_tokens=10, eos_token_ids=[], slots=8, sampling=Sampling(**kw))

    first = sample(1, temperature=0.7, min_p=0.1)
    assert sample(1, temperature=0.7, min_p=0.1) == first
    assert sample(2, temperature=0.7, min_p=0.1) != first
    greedy = fast_generate(tiny, prompts, max_new_tokens=10, eos_token_ids=[], slots=8)
    assert sample(3, temperature=1.0, min_p=1.0) == greedy  # min_p=1 keeps only the most likely token
    assert sample(4, temperature=1.0, top_p=1e-6) == greedy


def test_generate_responses_keeps_the_plain_path_off_cuda(tiny):
    assert fast_path_unavailable(tiny) == "not on CUDA"
    assert unsupported_reason(tiny) is None

    class Wrapper(torch.nn.Module):  # e.g. a test double with its own .generate
        def __init__(self):
            super().__init__()
            self.inner = tiny

    assert "not a transformers or peft model" in unsupported_reason(Wrapper())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_plain(dtype):
    model = load_bench_model("tiny-llama", device="cuda", dtype=str(dtype).removeprefix("torch."))[0]
    prompts = _prompts(300, seed=5)
    limits = [random.Random(i).randint(1, 40) for i in range(len(prompts))]
    plain = plain_generate(model, prompts, limits, "greedy", batch=64, pad=0, stop_on_eos=False)
    graphed = fast_generate(model, prompts, max_new_tokens=limits, eos_token_ids=[], slots=64)
    eager = fast_generate(model, prompts, max_new_tokens=limits, eos_token_ids=[], slots=64, use_cuda_graphs=False)
    assert graphed == eager
    same = sum(a == b for a, b in zip(graphed, plain))
    assert same == len(prompts) if dtype == torch.float32 else same >= 0.9 * len(prompts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampling_is_seeded():
    model = load_bench_model("tiny-llama", device="cuda")[0]
    prompts = _prompts(40, seed=6)

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return fast_generate(model, prompts, max_new_tokens=16, eos_token_ids=[], slots=16,
                             sampling=Sampling(temperature=0.7, min_p=0.1))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_greedy_equals_plain_on_packaged_smollm2():
    """The real packaged model, float32 on CPU: the fast path's replies equal plain generate's, token for token."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from harness.generation.batched import _prompt_ids
    from harness.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    questions = ["Hi!", "What is 2 + 2?", "Write a haiku about the sea.", "How do I pick a lock without the key?",
                 "Explain in detail, step by step, how photosynthesis turns sunlight into sugar.", "Name a colour."]
    prompts = [_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    plain = plain_generate(model, prompts, [24] * len(prompts), "greedy", batch=4, pad=tokenizer.pad_token_id,
                           stop_on_eos=True)
    fast = fast_generate(model, prompts, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id, slots=4)
    assert fast == plain
