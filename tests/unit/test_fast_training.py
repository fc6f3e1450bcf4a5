"""Packed LoRA training steps give the plain padded path's loss and gradients, on a tiny random Llama."""

import random

import pytest
import torch

from harness.training import fast_training
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


# --- the SFT fast path: packed class batches (harness.training.sft.train_sft on CUDA) -----------------------

PROCEDURES = [
    ("Bake a cake", ["Preheat the oven to 180 °C", 'Mix 2 cups of flour with 1 tsp. salt, then say "go."',
                     "Pour it into a 9\" pan; bake 30–35 minutes!", "Check it with a toothpick"]),
    ("Water a plant", ["Feel the soil", "Pour water slowly at the base until it drains"]),
    ("Tie a tie", ["Drape it around your neck", "Cross the wide end over", "Bring it up through the loop",
                   "Pull it down through the knot", "Tighten it"]),
    ("Boil an egg", ["Boil water", "Lower the egg in with a spoon", "Wait seven minutes", "Cool it in cold water"]),
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from harness.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")[1]


@pytest.fixture(scope="module")
def class_examples(smollm2_tokenizer):
    """Study B rows in every format, tokenized with format/content classes, as train_sft's dataset has them."""
    from harness.data.registry import Procedure
    from harness.data.formats import FORMATS, build_task_rows
    from harness.training.loss_classes import tokenize_row

    procedures = [Procedure(title, steps) for title, steps in PROCEDURES]
    rows = [row for fmt in FORMATS for row in build_task_rows(procedures, fmt)]
    return rows, [tokenize_row(smollm2_tokenizer, row) for row in rows]


def test_packed_class_collator_packs_classes_like_labels():
    from harness.training.loss_classes import CONTENT, FORMAT

    collator = fast_training.PackedClassCollator(pad_token_id=0, capacity=6)
    batch = collator([
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, -100, 7, 8],
         "token_classes": [0, 0, FORMAT, CONTENT]},
        {"input_ids": [9, 10, 11], "attention_mask": [1] * 3, "labels": [9, 10, 11],
         "token_classes": [CONTENT, FORMAT, CONTENT]},
        {"input_ids": [12, 13], "attention_mask": [1, 1], "labels": [-100, 13], "token_classes": [0, CONTENT]},
    ])
    assert set(batch) == {"input_ids", "position_ids", "labels", "token_classes"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 12, 13], [9, 10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 13], [-100, 10, 11, -100, -100, -100]]
    # each example's first class goes with its first label; classes stay FORMAT/CONTENT exactly where labels are
    assert batch["token_classes"].tolist() == [[0, 0, FORMAT, CONTENT, 0, CONTENT], [0, FORMAT, CONTENT, 0, 0, 0]]
    # an example longer than the capacity gets a row of its own instead of failing
    long = collator([{"input_ids": list(range(1, 9)), "labels": list(range(1, 9)), "token_classes": [CONTENT] * 8}])
    assert long["input_ids"].shape == (1, 8)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "trl-fused-lm-head"])
def test_packed_class_batch_gives_the_padded_losses_and_class_losses(smollm2_tokenizer, class_examples, make_tiny_llama, fused):
    """The same examples, padded (ClassCollator) or packed (PackedClassCollator): same loss, same format
    and content losses and token counts, same gradients; with logits and with TRL's fused LM head (SFTTrainer)."""
    from harness.training.loss_classes import ClassCollator, compute_loss_with_classes

    _, examples = class_examples
    model = make_tiny_llama(smollm2_tokenizer)
    if fused:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pad = smollm2_tokenizer.pad_token_id
    padded = ClassCollator(pad)(examples)
    capacity = 3 * max(len(e["input_ids"]) for e in examples)  # several examples a row
    packed = fast_training.PackedClassCollator(pad, capacity)(examples)
    assert packed["input_ids"].shape[0] < len(examples) // 2  # it did pack
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        loss, totals, _ = compute_loss_with_classes(model, batch, fused_lm_head=fused)
        results[name] = (loss, totals.as_log(), torch.autograd.grad(loss, params))
    (loss, log, grads), (packed_loss, packed_log, packed_grads) = results["padded"], results["packed"]
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert log["train_tokens_format"] > 0 and log["train_tokens_content"] > 0
    assert packed_log["train_tokens_format"] == log["train_tokens_format"]
    assert packed_log["train_tokens_content"] == log["train_tokens_content"]
    assert packed_log["train_loss_format"] == pytest.approx(log["train_loss_format"], rel=1e-5)
    assert packed_log["train_loss_content"] == pytest.approx(log["train_loss_content"], rel=1e-5)
    for a, b in zip(packed_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_trainer_logs_the_same_losses_packed_or_padded(smollm2_tokenizer, class_examples, make_tiny_llama, tmp_path):
    """train_sft's trainer (ClassLossSFTTrainer, TRL's fused LM head, LoRA) for 3 steps of 2 × 2 examples with
    ClassCollator, the same with PackedClassCollator, and packed with the step's two micro-batches merged into
    one of 4 (merge_accumulation): the same logged loss, gradient norm, format and content losses and token
    counts at every step (float32: SFTConfig turns bf16 on by itself; LoRA dropout 0; same seed and data order;
    plain SGD, since Adam's first steps turn rounding noise in near-zero gradient components into whole steps
    of the learning rate)."""
    from peft import LoraConfig
    from trl import SFTConfig

    from harness.training.loss_classes import ClassCollator, class_dataset
    from harness.training.sft import ClassLossSFTTrainer

    rows, _ = class_examples
    pad = smollm2_tokenizer.pad_token_id
    arms = {
        "padded": (ClassCollator(pad), 2, 2),
        "packed": (fast_training.PackedClassCollator(pad, 1024), 2, 2),
        "merged": (fast_training.PackedClassCollator(pad, 1024), 4, 1),
    }
    histories = {}
    for name, (collator, batch_size, grad_accum) in arms.items():
        args = SFTConfig(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, optim="sgd", learning_rate=1.0, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0,
            remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = ClassLossSFTTrainer(
            model=make_tiny_llama(smollm2_tokenizer), args=args, processing_class=smollm2_tokenizer,
            train_dataset=class_dataset(smollm2_tokenizer, rows, max_length=1024), data_collator=collator,
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        histories[name] = [log for log in trainer.state.log_history if "loss" in log]
    plain = histories.pop("padded")
    assert len(plain) == 3
    for name, history in histories.items():
        assert len(history) == 3, name
        for reference, log in zip(plain, history):
            assert log["loss"] == pytest.approx(reference["loss"], rel=1e-5)
            assert log["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
            for key in ("train_tokens_format", "train_tokens_content"):
                assert log[key] == reference[key] and reference[key] > 0
            for key in ("train_loss_format", "train_loss_content"):
                assert log[key] == pytest.approx(reference[key], rel=1e-5)


def test_merge_accumulation_keeps_the_padded_token_budget():
    lengths = [100] * 60 + [400] * 4
    # 16 × 2: the 32 longest hold 4 × 400 + 28 × 100 = 4,400 tokens <= 16 × 1,024: one micro-batch of 32
    assert fast_training.merge_accumulation(lengths, 16, 2, 1024) == (32, 1)
    assert fast_training.merge_accumulation(lengths, 16, 4, 1024) == (64, 1)  # 8,800 <= 16,384
    assert fast_training.merge_accumulation(lengths, 16, 4, 256) == (16, 4)  # two micro-batches: 4,400 > 16 × 256
    assert fast_training.merge_accumulation([1000] * 64, 4, 4, 1024) == (4, 4)  # long rows: as configured
    assert fast_training.merge_accumulation([500] * 64, 4, 4, 1024) == (8, 2)  # two by two
    assert fast_training.merge_accumulation(lengths, 16, 1, 1024) == (16, 1)


def test_fast_training_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("HARNESS_FAST_TRAINING", raising=False)
    assert fast_training.fast_training_unavailable() is None
    for off in ("0", "off", "False"):
        monkeypatch.setenv("HARNESS_FAST_TRAINING", off)
        assert "HARNESS_FAST_TRAINING" in fast_training.fast_training_unavailable()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HARNESS_FAST_TRAINING", "1")
    assert fast_training.fast_training_unavailable() == "not on CUDA"


def test_lora_weights_go_back_to_float32_and_the_frozen_base_stays(smollm2_tokenizer, make_tiny_llama):
    """TRL gives a 4-bit model's LoRA weights bfloat16, where Study B's LR 5e-5 updates round away; the harness puts
    them back to float32 before the optimizer exists (bitsandbytes itself is GPU-only: test_qlora_gpu.py)."""
    from peft import get_peft_model

    from harness.config import TrainConfig
    from harness.training.sft import keep_adapter_in_float32, lora_config

    model = get_peft_model(make_tiny_llama(smollm2_tokenizer).to(torch.bfloat16), lora_config(TrainConfig()))
    for parameter in model.parameters():  # what SFTTrainer does to a quantised model's adapter
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    assert keep_adapter_in_float32(model) == "float32"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
