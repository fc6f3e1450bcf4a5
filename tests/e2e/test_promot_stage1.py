"""ProMoT stage 1 on the real SmolLM2 (minutes on CPU): split from tests/unit/test_promot.py, whose other
tests run on a tiny random Llama."""

import pytest

from harness.data import registry as data
from harness.data import formats
from harness.training import promot
from harness.config import PromotConfig, Stage1Config, TrainConfig
from harness.generation.batched import generate_responses
from harness.models import load_model

from helpers import RecordingRun, conversations


@pytest.mark.e2e
def test_stage1_on_json_moves_the_format_into_the_prompt(tmp_path):
    """The issue's behavioural check on the real SmolLM2 (about 4 minutes on 2 CPU cores): after stage 1 on
    JSON rows, generating *with* the prompt is JSON far more often than the base model; without the prompt
    the (frozen) model answers exactly as before. Measured when written: 6/6 with the prompt, 0/6 base."""
    from harness.evals.scoring import score_task

    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    shortest = sorted(data.load_procedures(None), key=lambda p: len(" ".join(p.steps)))
    train_rows = formats.build_task_rows(shortest[:24], "json")
    test_rows = formats.build_task_rows(shortest[24:30], "json")
    prompts = conversations(test_rows)

    def adherence(responses):
        return score_task(test_rows, responses, "json", sbert_model="all-MiniLM-L6-v2", seed=0).metrics["format_adherence"]

    base = generate_responses(model, tokenizer, prompts, max_new_tokens=64, progress=False)
    cfg = PromotConfig(prompt_length=16, stage1=Stage1Config(learning_rate=0.1, batch_size=8, grad_accum=1, epochs=12,
                                                             warmup_steps=0))
    prompt = promot.train_stage1(model, tokenizer, train_rows, cfg, TrainConfig(max_length=192), seed=0,
                                 output_dir=tmp_path / "stage1",
                                 run=RecordingRun(), meta={"model": "smollm2-135m-instruct"})
    with_prompt = generate_responses(promot.SoftPromptedLM(model, prompt.embeddings, trainable=False), tokenizer,
                                     prompts, max_new_tokens=64, progress=False)
    without = generate_responses(model, tokenizer, prompts, max_new_tokens=64, progress=False)
    assert adherence(with_prompt) >= adherence(base) + 0.5, with_prompt
    assert without == base and adherence(without) == adherence(base)
