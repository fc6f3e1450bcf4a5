"""Packed LoRA training steps give the plain padded path's loss and gradients, on a tiny random Llama."""

import random

import pytest
import torch

from harness import fast_training
from harness.bench import _padded_batch, load_bench_model, training_examples


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pack_respects_capacity_and_keeps_every_example():
    lengths = [random.Random(i).randint(1, 100) for i in range(50)]
    rows = fast_training.pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) < 50  # it did pack
    with pytest.raises(ValueError, match="longer than the row capacity"):
        fast_training.pack([10, 200], 128)


def test_packed_loss_and_gradients_equal_the_padded_batch():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_bench_model("tiny-llama", device="cpu")[0],
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False),
    )
    examples = training_examples(512, 9, 64, "mix", random.Random(0))
    params = [p for p in model.parameters() if p.requires_grad]

    plain = model(**_padded_batch(examples, 0), use_cache=False).loss
    plain_grads = torch.autograd.grad(plain, params)

    lengths = [len(ids) for ids, _ in examples]
    rows = fast_training.pack(lengths, 64)
    labelled = sum(sum(t != -100 for t in targets[1:]) for _, targets in examples)
    packed, packed_grads = 0.0, [torch.zeros_like(p) for p in params]
    for group in fast_training.micro_batches(rows, lengths, max_tokens=128):  # several micro-batches
        loss = fast_training.packed_loss(model, fast_training.packed_batch(examples, group, 0), labelled)
        packed += loss.item()
        for total, grad in zip(packed_grads, torch.autograd.grad(loss, params)):
            total += grad
    assert packed == pytest.approx(plain.item(), rel=1e-5)
    for a, b in zip(packed_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_matches_torch():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    old = fast_training.LOGITS_PER_CHUNK
    fast_training.LOGITS_PER_CHUNK = 300 * 8  # several chunks
    try:
        ours = fast_training.chunked_cross_entropy(hidden, weight, targets)
    finally:
        fast_training.LOGITS_PER_CHUNK = old
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight)))


def test_collator_labels_completion_only():
    collator = fast_training.PackedCompletionCollator(pad_token_id=0, max_length=6)
    batch = collator([
        {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10, 11], "completion_mask": [0, 1, 1]},
        {"input_ids": [12, 13], "completion_mask": [0, 1]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 12, 13], [9, 10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 13], [-100, 10, 11, -100, -100, -100]]
    # TRL >= 1.x hands over a labels column instead of the masks
    relabelled = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert relabelled["labels"].tolist() == [[-100, 6, 7, -100, 9]]
