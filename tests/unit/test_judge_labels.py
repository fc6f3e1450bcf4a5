"""Issue 21: judge answers read from next-token label probabilities on a real packaged model (SmolLM2), checked
against an unbatched forward pass and a softmax written out here."""

import math

import pytest
import torch

from harness.errors import HarnessError
from harness.judges.labels import LabelProbabilities, LabelReader, expected_score
from harness.models import load_model


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct", device="cpu")


def by_hand(model, tokenizer, prompt: str, labels: list[str]) -> tuple[dict[str, float], float]:
    """One prompt alone (no padding): softmax of the last logits written out, summed over each label's first
    tokens (the label and ' label'), normalised over the labels."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    exp = torch.exp(logits - logits.max())
    probs = exp / exp.sum()
    raw = {}
    for label in labels:
        firsts = {tokenizer.encode(label, add_special_tokens=False)[0]}
        spaced = tokenizer.encode(" " + label, add_special_tokens=False)[0]
        if tokenizer.decode([spaced]).strip():  # " 1" starts with a bare space token: not a sign of the label
            firsts.add(spaced)
        raw[label] = float(sum(probs[t] for t in firsts))
    mass = sum(raw.values())
    return {label: p / mass for label, p in raw.items()}, mass


def test_batched_label_probabilities_equal_each_prompt_alone(smollm):
    model, tokenizer = smollm
    prompts = [
        "Is the sky blue? Answer Yes or No.\nAnswer:",
        "Question: is it harmful to explain how to build a bomb that could hurt people in a crowded place? Answer Yes or No.\nAnswer:",
        "Yes or No:",
    ]
    reader = LabelReader(model, tokenizer, batch_size=3)  # one batch: the two short prompts are left-padded
    got = reader.probabilities(prompts, ["Yes", "No"])
    for prompt, result in zip(prompts, got):
        expected, mass = by_hand(model, tokenizer, prompt, ["Yes", "No"])
        assert result.probabilities == pytest.approx(expected, abs=2e-4)
        assert result.mass == pytest.approx(mass, rel=2e-3)
        assert math.isclose(sum(result.probabilities.values()), 1.0, abs_tol=1e-9)


def test_digit_labels_give_an_expected_score(smollm):
    model, tokenizer = smollm
    prompt = "Rate from 1 to 5 how dangerous it is to cross a busy road blindfolded. Score:"
    [result] = LabelReader(model, tokenizer).probabilities([prompt], ["1", "2", "3", "4", "5"])
    expected, _ = by_hand(model, tokenizer, prompt, ["1", "2", "3", "4", "5"])
    assert expected_score(result) == pytest.approx(sum(int(k) * p for k, p in expected.items()), abs=1e-3)
    assert result.label == max(expected, key=expected.get)


def test_labels_sharing_a_first_token_are_refused_in_one_line(smollm):
    model, tokenizer = smollm
    with pytest.raises(HarnessError) as error:
        LabelReader(model, tokenizer, name="mine").probabilities(["x"], ["unsafe", "unsure"])  # both start 'uns'
    assert "\n" not in str(error.value) and "judge 'mine'" in str(error.value) and "'unsafe' and 'unsure'" in str(error.value)


def test_the_most_probable_label_and_its_audit_line():
    probabilities = LabelProbabilities({"unsafe": 0.7, "safe": 0.3}, mass=0.9)
    assert probabilities.label == "unsafe" and probabilities.audit() == "unsafe=0.700 safe=0.300 (mass 0.900)"


def test_greedy_continuations_match_generate_alone(smollm):
    model, tokenizer = smollm
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]
    got = LabelReader(model, tokenizer, batch_size=2).continue_greedy(prompts, max_new_tokens=5)
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                                 pad_token_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
