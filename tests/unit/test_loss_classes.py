"""Format-vs-content loss classes (issue 10, part 1) on the real SmolLM2-135M tokenizer and model.

A SmolLM2 forward pass takes seconds on two CPU cores, so the real model scores one batch (the identity
with the model's own loss); the one-forward and Trainer tests run a tiny random Llama with SmolLM2's
vocabulary, which exercises the same code paths (logits, TRL's fused LM head, LoRA) in a fraction of the time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.data import formats
from harness.data.registry import Procedure
from harness.errors import HarnessError
from harness.data.formats import FORMATS, FormatError, render
from harness.training.loss_classes import (
    CONTENT,
    FORMAT,
    IGNORE_INDEX,
    NOT_IN_LOSS,
    ClassCollator,
    ClassLossMixin,
    class_dataset,
    class_losses,
    compute_loss_with_classes,
    format_spans_of_rendered,
    tokenize_row,
    tokenize_with_classes,
)
from harness.models import load_model
from harness.training.sft import user_message

ALIAS = "smollm2-135m-instruct"
END_OF_TURN = "<|im_end|>\n"  # what SmolLM2's template puts after the assistant's text
PROCEDURE = Procedure(
    "Bake a cake",
    [
        "Preheat the oven to 180 °C",
        'Mix 2 cups of flour with 1 tsp. salt, then say "go."',
        "Pour it into a 9\" pan; bake 30–35 minutes!",
        "Check it with a toothpick \\ a knife",
    ],
)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model(ALIAS, device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture
def tiny_model(tokenizer, make_tiny_llama):
    return make_tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def rows():
    return {fmt: formats.build_task_rows([PROCEDURE], fmt)[0] for fmt in FORMATS}


@pytest.fixture(scope="module")
def examples(tokenizer, rows):
    return {fmt: tokenize_row(tokenizer, row) for fmt, row in rows.items()}


def prompt_text(tokenizer, row) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(row)}], tokenize=False, add_generation_prompt=True
    )


def pieces(tokenizer, example, cls):
    """Decoded text of each token of class `cls`."""
    return [tokenizer.decode([t]) for t, c in zip(example["input_ids"], example["token_classes"]) if c == cls]


# --- tokenization and classes --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_loss_token_has_exactly_one_class_and_prompt_tokens_none(tokenizer, rows, examples, fmt):
    example, row = examples[fmt], rows[fmt]
    ids, labels, classes = example["input_ids"], example["labels"], example["token_classes"]
    assert len(ids) == len(labels) == len(classes) == len(example["attention_mask"])
    in_loss = [label != IGNORE_INDEX for label in labels]
    # one class per loss token, none elsewhere
    assert [c != NOT_IN_LOSS for c in classes] == in_loss
    assert {c for c, inside in zip(classes, in_loss) if inside} <= {FORMAT, CONTENT}
    assert all(label == i for label, i, inside in zip(labels, ids, in_loss) if inside)
    # the loss is one contiguous stretch: the assistant turn, response and end of turn
    n_prompt = in_loss.index(True)
    assert all(in_loss[n_prompt:])
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text(tokenizer, row)
    assert tokenizer.decode(ids[n_prompt:]) == row.response + END_OF_TURN
    counts = {cls: classes.count(cls) for cls in (FORMAT, CONTENT)}
    if fmt == "prose":
        assert counts[FORMAT] == 0 and counts[CONTENT] == sum(in_loss)
    else:
        assert counts[FORMAT] > 0 and counts[CONTENT] > 0


def test_labels_match_trl_completion_only_loss(tokenizer, rows, examples):
    """The same tokens, and the same loss tokens, as TRL's conversational prompt-completion path."""
    from trl.data_utils import common_prefix_length

    for fmt, row in rows.items():
        # TRL's conversational prompt-completion form of the row
        conversation = {
            "prompt": [{"role": "user", "content": user_message(row)}],
            "completion": [{"role": "assistant", "content": row.response}],
        }
        prompt_ids = tokenizer.apply_chat_template(conversation["prompt"], add_generation_prompt=True, return_dict=True)
        full_ids = tokenizer.apply_chat_template(
            conversation["prompt"] + conversation["completion"], return_dict=True
        )["input_ids"]
        prompt_len = common_prefix_length(prompt_ids["input_ids"], full_ids)
        assert examples[fmt]["input_ids"] == full_ids
        assert examples[fmt]["labels"] == [IGNORE_INDEX] * prompt_len + full_ids[prompt_len:]


def test_format_tokens_are_made_of_format_characters_only(tokenizer, rows, examples):
    for fmt in ("list", "json"):
        response = rows[fmt].response
        span_texts = [response[a:b] for a, b in rows[fmt].meta["format_spans"]]
        format_pieces = pieces(tokenizer, examples[fmt], FORMAT)
        assert all(any(p in s for s in span_texts) for p in format_pieces), format_pieces
    assert set(pieces(tokenizer, examples["list"], FORMAT)) == {"-", "\n"}
    json_format = "".join(pieces(tokenizer, examples["json"], FORMAT))
    assert json_format.startswith('{"procedure":') and json_format.endswith('"]}')
    # tokens merging content and format are content ('.",' ends a sentence), end of turn is content
    content = pieces(tokenizer, examples["json"], CONTENT)
    assert '.",' in content and content[-2:] == ["<|im_end|>", "\n"]


def test_straddle_and_template_options(tokenizer, rows):
    row = rows["json"]
    messages = [{"role": "user", "content": row.instruction}]
    spans = row.meta["format_spans"]
    majority = tokenize_with_classes(tokenizer, messages, row.response, spans, straddle="majority")
    assert '.",' in pieces(tokenizer, majority, FORMAT)  # one content character, two format ones
    prose = rows["prose"]
    as_format = tokenize_with_classes(tokenizer, messages, prose.response, [], template_class=FORMAT)
    assert pieces(tokenizer, as_format, FORMAT) == ["<|im_end|>", "\n"]


def test_spans_are_checked_and_truncation_keeps_the_start(tokenizer, rows):
    row = rows["list"]
    messages = [{"role": "user", "content": row.instruction}]
    rendered = render("list", formats.sentences_from_steps(PROCEDURE.steps))
    assert rendered.text == row.response
    full = tokenize_with_classes(tokenizer, messages, row.response, rendered.format_spans, rendered.content_spans)
    assert full == tokenize_row(tokenizer, row)
    with pytest.raises(HarnessError, match="uncovered"):
        tokenize_with_classes(tokenizer, messages, row.response, rendered.format_spans, rendered.content_spans[1:])
    with pytest.raises(HarnessError, match="outside"):
        tokenize_with_classes(tokenizer, messages, row.response, [(0, len(row.response) + 1)])
    cut = tokenize_row(tokenizer, row, max_length=len(full["input_ids"]) - 5)
    assert all(cut[key] == full[key][:-5] for key in full)
    # prose's joining spaces are not format; the raw render spans would make the lone " " before "2" format
    prose = render("prose", ["Open it.", "2 eggs."])
    assert format_spans_of_rendered("prose", prose) == [] and prose.format_spans == [(8, 9)]
    raw = tokenize_with_classes(tokenizer, messages, prose.text, prose.format_spans)
    assert pieces(tokenizer, raw, FORMAT) == [" "]


# --- losses --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(examples, tokenizer):
    return ClassCollator(tokenizer.pad_token_id)([examples[fmt] for fmt in FORMATS])


def test_collator_pads_right(batch, examples):
    lengths = [len(examples[fmt]["input_ids"]) for fmt in FORMATS]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["token_classes"][i, n:] == 0).all()


def assert_identity(stats):
    total = stats["n_tokens"] * stats["train_loss"]
    parts = [stats[f"n_tokens_{c}"] * stats[f"train_loss_{c}"] for c in ("format", "content") if stats[f"n_tokens_{c}"]]
    assert torch.allclose(sum(parts).float(), total.float(), rtol=1e-5)
    assert stats["n_tokens"] == stats["n_tokens_format"] + stats["n_tokens_content"]


def test_class_losses_add_up_to_the_model_loss(smollm2, batch):
    model, _ = smollm2
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    stats = class_losses(outputs.logits, batch["labels"], batch["token_classes"])
    assert torch.allclose(stats["train_loss"], outputs.loss, rtol=1e-5)  # the causal shift is the model's own
    assert_identity(stats)
    assert stats["n_tokens"] == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert 0 < stats["train_loss_format"] and 0 < stats["train_loss_content"]
    # prose alone: no format tokens, the content loss is the loss
    prose = class_losses(outputs.logits[:1], batch["labels"][:1], batch["token_classes"][:1])
    assert prose["n_tokens_format"] == 0 and math.isnan(prose["train_loss_format"])
    assert torch.allclose(prose["train_loss_content"].float(), prose["train_loss"])
    assert_identity(prose)
    with pytest.raises(HarnessError, match="token_classes"):
        class_losses(outputs.logits, batch["labels"], torch.zeros_like(batch["token_classes"]))


def test_compute_loss_with_classes_one_forward(tiny_model, batch):
    model = tiny_model
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        loss, totals, outputs = compute_loss_with_classes(model, batch)
    finally:
        hook.remove()
    assert len(calls) == 1 and "token_classes" in batch and loss.requires_grad
    stats = class_losses(outputs.logits, batch["labels"], batch["token_classes"])
    assert torch.allclose(loss, stats["train_loss"])
    log = totals.as_log()
    assert log["train_loss_format"] == pytest.approx(stats["train_loss_format"].item())
    assert log["train_loss_content"] == pytest.approx(stats["train_loss_content"].item())
    assert log["train_tokens_format"] + log["train_tokens_content"] == stats["n_tokens"].item()
    n = int(stats["n_tokens"]) * 4  # as if three more micro-batches were accumulated
    assert torch.allclose(compute_loss_with_classes(model, batch, num_items_in_batch=n)[0], loss / 4)
    prose = {key: value[:1] for key, value in batch.items()}
    assert "train_loss_format" not in compute_loss_with_classes(model, prose)[1].as_log()


# --- in a Trainer --------------------------------------------------------------------------------


def test_fused_lm_head_gives_the_same_losses(tiny_model, batch):
    """TRL's SFTTrainer patches the model to return per-token log-probabilities instead of logits."""
    from trl.trainer.utils import add_fused_lm_head

    loss, totals, _ = compute_loss_with_classes(tiny_model, batch)
    add_fused_lm_head(tiny_model)
    fused_loss, fused_totals, outputs = compute_loss_with_classes(tiny_model, batch, fused_lm_head=True)
    assert outputs.log_probs.shape == (3, batch["labels"].shape[1] - 1)
    assert torch.allclose(fused_loss, loss, rtol=1e-5)
    assert torch.allclose(fused_totals.totals, totals.totals, rtol=1e-5)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def prompt_tuning():
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)


@pytest.mark.parametrize(
    "trainer_kind, peft_config",
    [("sft", lora), ("trainer", lora), ("trainer", prompt_tuning)],
    ids=["SFTTrainer-lora", "Trainer-lora", "Trainer-prompt-tuning"],
)
def test_trainer_logs_class_losses(tiny_model, tokenizer, rows, tmp_path, trainer_kind, peft_config):
    """Wired as the lead will: SFTTrainer (fused LM head) for SFT; a plain Trainer for ProMoT, whose
    stage 1 tunes a soft prompt (virtual tokens lengthen the model's outputs) and stage 2 is LoRA."""
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    dataset = class_dataset(tokenizer, [rows[fmt] for fmt in FORMATS] * 2, max_length=256)
    options = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # else the Trainer drops token_classes
    )
    common = dict(
        train_dataset=dataset,
        eval_dataset=dataset.select(range(3)),
        processing_class=tokenizer,
        data_collator=ClassCollator(tokenizer.pad_token_id),
    )
    if trainer_kind == "sft":

        class ClassLossSFTTrainer(ClassLossMixin, SFTTrainer):
            pass

        args = SFTConfig(**options, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = ClassLossSFTTrainer(model=tiny_model, args=args, peft_config=peft_config(), **common)
    else:
        from peft import get_peft_model

        class ClassLossTrainer(ClassLossMixin, Trainer):
            pass

        model = get_peft_model(tiny_model, peft_config())
        trainer = ClassLossTrainer(model=model, args=TrainingArguments(**options), **common)
    trainer.train()
    assert trainer.class_loss_fused_lm_head == (trainer_kind == "sft")
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        n_format, n_content = log["train_tokens_format"], log["train_tokens_content"]
        assert n_format > 0 and n_content > 0
        weighted = (n_format * log["train_loss_format"] + n_content * log["train_loss_content"]) / (
            n_format + n_content
        )
        assert weighted == pytest.approx(log["loss"], abs=1e-3)  # the Trainer rounds its loss to 4 decimals
    (evaluation,) = [log for log in trainer.state.log_history if "eval_loss" in log]
    n_format, n_content = evaluation["eval_tokens_format"], evaluation["eval_tokens_content"]
    weighted = (n_format * evaluation["eval_loss_format"] + n_content * evaluation["eval_loss_content"]) / (
        n_format + n_content
    )
    assert weighted == pytest.approx(evaluation["eval_loss"], rel=1e-4)  # one eval batch: exact


# --- property: random sentences ------------------------------------------------------------------

WORDS = st.text(st.sampled_from(list('abcXYZ019.,:;"\'()[]{}\\/-•é½“”’…')), min_size=1, max_size=6)


@st.composite
def sentence(draw) -> str:
    first = draw(st.sampled_from(["Tap", "Open", "A", "3", '"Go', "Élan", "(Optional)"]))
    words = draw(st.lists(WORDS, max_size=5))
    return " ".join([first, *words]) + draw(st.sampled_from([".", "!", "?", "…", '."', ".)"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(sentence(), min_size=1, max_size=4))
def test_random_sentences_classes_partition_the_loss(tokenizer, sentences):
    try:
        formats.check_sentences(sentences)
    except FormatError:
        assume(False)
    messages = [{"role": "user", "content": "Explain the procedure for: x"}]
    for fmt in FORMATS:
        rendered = render(fmt, sentences)
        spans = format_spans_of_rendered(fmt, rendered)
        content_spans = None if fmt == "prose" else rendered.content_spans
        example = tokenize_with_classes(tokenizer, messages, rendered.text, spans, content_spans)
        in_loss = [label != IGNORE_INDEX for label in example["labels"]]
        classes = example["token_classes"]
        assert [c != NOT_IN_LOSS for c in classes] == in_loss
        assert {c for c, inside in zip(classes, in_loss) if inside} <= {FORMAT, CONTENT}
        start = in_loss.index(True)
        assert tokenizer.decode(example["input_ids"][start:]) == rendered.text + END_OF_TURN
        assert (FORMAT in classes) == (fmt != "prose")
        assert CONTENT in classes
