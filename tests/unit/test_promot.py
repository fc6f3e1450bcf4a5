"""ProMoT's two stages on a tiny random Llama over SmolLM2's real tokenizer (millisecond forwards).

What must hold whatever the data: stage 1 moves only the prompt, stage 2 only LoRA under the frozen stage-1
prompt (the prompt stays bit-for-bit), the saved artifacts reload and reproduce the same greedy outputs, the
pipeline evaluates checkpoints without the prompt unless told to, the seed alone fixes the starting adapter
(ProMoT's and SFT's), and bad inputs are one-line errors before anything is trained.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from harness.data import registry as data
from harness.data import formats
from harness.training import promot
from harness.config import PromotConfig, Stage1Config, TrainConfig, parse_config
from harness.errors import HarnessError
from harness.generation.batched import generate_responses
from harness.models import load_adapter, load_model
from harness.training.sft import TrainingDiverged, user_message

from helpers import RecordingRun, conversations, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2-135m-instruct", device="cpu")[1]


@pytest.fixture(scope="module")
def rows():
    procedures = sorted(data.load_procedures(None), key=lambda p: len(" ".join(p.steps)))[:12]
    return formats.build_task_rows(procedures, "json")


def settings(**stage1) -> PromotConfig:
    return PromotConfig(prompt_length=8, stage1=Stage1Config(batch_size=4, grad_accum=1, warmup_steps=0, **stage1))


TRAIN = TrainConfig(learning_rate=1e-3, warmup_steps=0, batch_size=4, grad_accum=1, epochs=2, max_length=128)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def record_trained_models(monkeypatch, trainer_class) -> list:
    """The models `trainer_class.train` is called on, in order: the very module a stage trains, not a copy."""
    models = []
    train = trainer_class.train

    def recording_train(self, *args, **kwargs):
        models.append(self.model)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "train", recording_train)
    return models


def test_stage1_trains_only_the_prompt_and_its_artifact_reproduces_outputs(tokenizer, rows, tmp_path):
    model = tiny_llama(tokenizer)
    before = weights(model)
    start = promot.initial_prompt(model, tokenizer, 8, "random", None, seed=0)
    run = RecordingRun()
    prompt = promot.train_stage1(model, tokenizer, rows, settings(epochs=1.5), TRAIN, seed=0,
                                 output_dir=tmp_path / "stage1", run=run, meta={"model": "tiny", "model_digest": "d1"})
    after = weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before), "stage 1 changed the model"
    assert not torch.equal(prompt.embeddings, start), "stage 1 did not move the prompt"
    # 12 rows / batch 4 = 3 steps an epoch; 1.5 epochs → 5 steps (rounded up), one loss each.
    assert prompt.meta["steps"] == 5 and len([m for _, m in run.metrics if "train_loss" in m]) == 5
    # JSON rows have format tokens, so both class losses are logged (issue 10).
    assert all("train_loss_format" in m and "train_loss_content" in m for _, m in run.metrics if "train_loss" in m)

    reloaded = promot.SoftPrompt.load(tmp_path / "stage1", expect_model_digest="d1")
    assert torch.equal(reloaded.embeddings, prompt.embeddings)
    assert reloaded.meta["length"] == 8 and reloaded.meta["model"] == "tiny"
    batch = tokenizer([user_message(row) for row in rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained_logits = promot.SoftPromptedLM(model, prompt.embeddings, trainable=False)(**batch).logits
        reloaded_logits = promot.SoftPromptedLM(model, reloaded.embeddings, trainable=False)(**batch).logits
        initial_logits = promot.SoftPromptedLM(model, start, trainable=False)(**batch).logits
    assert torch.equal(trained_logits, reloaded_logits), "the reloaded prompt computes something else"
    assert not torch.allclose(trained_logits, initial_logits), "the trained prompt changes nothing"
    prompts = conversations(rows[:4])
    first = generate_responses(promot.SoftPromptedLM(model, prompt.embeddings, trainable=False), tokenizer, prompts,
                               max_new_tokens=8, progress=False)
    again = generate_responses(promot.SoftPromptedLM(model, reloaded.embeddings, trainable=False), tokenizer, prompts,
                               max_new_tokens=8, progress=False)
    assert first == again


def test_stage2_keeps_the_prompt_and_base_weights_and_saves_every_epoch(tokenizer, rows, tmp_path, monkeypatch):
    model = tiny_llama(tokenizer)
    before = weights(model)
    prompt = promot.SoftPrompt(promot.initial_prompt(model, tokenizer, 8, "random", None, seed=1), {"model_digest": "d1"})
    prompt_before = prompt.embeddings.clone()
    trained_models = record_trained_models(monkeypatch, promot._PromptedTrainer)
    run = RecordingRun()
    checkpoints = promot.train_stage2(model, tokenizer, rows[:8], rows[8:10], prompt, TRAIN, seed=0,
                                      output_dir=tmp_path / "stage2", run=run)
    assert [c.epoch for c in checkpoints] == [1, 2]
    assert all((c.path / "adapter_config.json").is_file() for c in checkpoints)
    # SoftPromptedLM holds a copy of the prompt, so the caller's tensor stays put whatever stage 2 does: the
    # prompt to check is the one inside the model the Trainer trained.
    [stage2] = trained_models
    assert not stage2.prompt.requires_grad, "stage 2 trains the prompt"
    assert torch.equal(stage2.prompt.detach().cpu(), prompt_before), "stage 2 changed the stage-1 prompt"
    assert torch.equal(prompt.embeddings, prompt_before), "stage 2 changed the stage-1 prompt"
    trained = model  # get_peft_model injected LoRA layers into this very model
    base_after = {name.replace("base_layer.", ""): tensor for name, tensor in weights(trained).items() if "lora_" not in name}
    assert all(torch.equal(before[name], base_after[name]) for name in before), "stage 2 changed a base weight"
    assert any("eval_loss" in m for _, m in run.metrics)

    # Inference drops the prompt: a fresh base model + the saved adapter reproduces the trained model's outputs.
    prompts = conversations(rows[:4])
    from peft import PeftModel

    assert isinstance(trained, torch.nn.Module)
    live = generate_responses(trained, tokenizer, prompts, max_new_tokens=8, progress=False)
    reloaded = load_adapter(tiny_llama(tokenizer), checkpoints[-1].path)
    assert isinstance(reloaded, PeftModel)
    assert generate_responses(reloaded, tokenizer, prompts, max_new_tokens=8, progress=False) == live


def test_stage2_trains_the_adapter_under_the_stage1_prompt(tokenizer, rows, tmp_path, monkeypatch):
    """The model stage 2 trains is the LoRA model with the stage-1 prompt in front: its output is that of
    `SoftPromptedLM(adapter, prompt)`, and not that of the adapter alone."""
    model = tiny_llama(tokenizer)
    prompt = promot.SoftPrompt(promot.initial_prompt(model, tokenizer, 8, "random", None, seed=1), {})
    prompt_before = prompt.embeddings.clone()
    trained_models = record_trained_models(monkeypatch, promot._PromptedTrainer)
    promot.train_stage2(model, tokenizer, rows[:4], [], prompt, TRAIN.model_copy(update={"epochs": 1}), seed=0,
                        output_dir=tmp_path / "stage2", run=RecordingRun())
    [stage2] = trained_models
    stage2.eval()  # no LoRA dropout: the two forwards below must be comparable
    adapter_alone = model.eval()  # get_peft_model injected the trained LoRA layers into this very model
    batch = tokenizer([user_message(row) for row in rows[:2]], return_tensors="pt", padding=True)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        trained = stage2(**batch).logits
        alone = adapter_alone(**batch).logits
        prompted = promot.SoftPromptedLM(adapter_alone, prompt_before, trainable=False)(**batch).logits
    assert not torch.allclose(trained[:, -length:], alone, atol=1e-4), "stage 2 trains without the prompt"
    assert trained.shape[1] == length + 8 and torch.equal(trained, prompted), "stage 2's prompt is not stage 1's"


class _Started(Exception):
    """Raised instead of training: carries the LoRA weights the Trainer was about to start from."""

    def __init__(self, lora: dict[str, torch.Tensor]):
        super().__init__("training started")
        self.lora = lora


def _stop_at_start(self, *args, **kwargs):
    raise _Started({name: p.detach().clone() for name, p in self.model.named_parameters() if "lora_" in name})


@pytest.mark.parametrize("method", ["sft", "promot"])
def test_the_seed_alone_fixes_the_starting_adapter(method, tokenizer, rows, tmp_path, monkeypatch):
    """Issue 19: peft draws `lora_A` from the global RNG when the adapter is created, before the Trainer seeds
    anything, so the same seed gave another adapter when the process had drawn other random numbers first (a
    rerun that reuses stage 1 instead of training it). Two RNG histories, same seed: the same starting adapter."""
    import random

    import numpy as np

    from harness.training import sft

    if method == "sft":
        trainer_class = sft.ClassLossSFTTrainer
        # TRL 1.16 also seeds before it creates the adapter; switched off here, so that what is tested is the
        # harness's own seeding, which must not depend on the TRL version (pyproject allows trl>=1.0).
        monkeypatch.setattr("trl.trainer.sft_trainer.set_seed", lambda *args, **kwargs: None, raising=False)
    else:
        trainer_class = promot._PromptedTrainer
    monkeypatch.setattr(trainer_class, "train", _stop_at_start)
    prompt = promot.SoftPrompt(promot.initial_prompt(tiny_llama(tokenizer), tokenizer, 8, "random", None, seed=1), {})
    starts = []
    for history, seed in ((1, 0), (2, 0), (1, 1)):
        model = tiny_llama(tokenizer)
        torch.manual_seed(history), random.seed(history), np.random.seed(history)  # what the process ran before
        with pytest.raises(_Started) as started:
            if method == "sft":
                sft.train_sft(model, tokenizer, rows[:4], [], TRAIN, seed=seed, output_dir=tmp_path / f"{history}-{seed}",
                              run=RecordingRun())
            else:
                promot.train_stage2(model, tokenizer, rows[:4], [], prompt, TRAIN, seed=seed,
                                    output_dir=tmp_path / f"{history}-{seed}", run=RecordingRun())
        starts.append(started.value.lora)
    same_seed, other_seed = starts[1], starts[2]
    assert any("lora_A" in name for name in starts[0]) and starts[0].keys() == same_seed.keys()
    assert all(torch.equal(starts[0][name], same_seed[name]) for name in starts[0]), \
        "the same seed started from another adapter after other random draws"
    assert not all(torch.equal(starts[0][name], other_seed[name]) for name in starts[0]), "the seed changes nothing"


class _FakeTracker:
    """Stands in for the pipeline's MLflow tracker: nothing is finished yet, every run is a `RecordingRun`."""

    def finished(self, *args, **kwargs):
        return None

    @contextlib.contextmanager
    def run(self, *args, **kwargs):
        run = RecordingRun()
        run.run_id = "checkpoint-run"
        yield run


@pytest.mark.parametrize("with_prompt", [False, True])
def test_the_pipeline_evaluates_promot_checkpoints_without_the_prompt_unless_asked(with_prompt, tokenizer, rows,
                                                                                    tmp_path):
    """Study B evaluates base model + stage-2 adapter alone (the prompt, holding the format, is thrown away);
    `train.promot.evaluate_with_prompt` adds a second evaluation of each checkpoint with the prompt put back.
    Runs the ProMoT recipe (harness/training/methods.py) on a tiny model, with a stub for what evaluates a model state."""
    from harness.config import parse_config
    from harness.training.methods import ProMoT
    from harness.study.runner import ExperimentRunner, PreparedData

    cfg = parse_config({
        "name": "promot-eval", "model": "tiny", "output_dir": str(tmp_path),
        "train": {"methods": ["promot"], "learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 4, "grad_accum": 1,
                  "epochs": 1, "max_length": 128,
                  "promot": {"prompt_length": 8, "evaluate_with_prompt": with_prompt}},
    })
    runner = ExperimentRunner(cfg)
    runner.eval_model, runner.tokenizer, runner.tracker = tiny_llama(tokenizer), tokenizer, _FakeTracker()
    runner.data = PreparedData(train={"json": rows[:4]}, val={"json": []}, test={}, harmful=[], checksums={})
    prompt = promot.SoftPrompt(promot.initial_prompt(runner.eval_model, tokenizer, 8, "random", None, seed=1), {})
    recipe = ProMoT()
    recipe.stage1_prompt = lambda *args, **kwargs: prompt
    runner.base_state = lambda: "tiny"
    evaluated = []

    def evaluate(run_id, unit, tags, label, score_formats, open_model):
        """What evaluates a model state, stubbed: opens the model the way a generation would."""
        with open_model() as (model, state):
            evaluated.append((model, unit, tags, {name: weight.clone() for name, weight in model.state_dict().items()}))

    runner.evaluate = evaluate

    tags = {"model": "tiny", "dataset": "wikihow", "format": "json", "method": "promot", "seed": 0}
    recipe.train(runner, RecordingRun(), {"method": "promot"}, tags, tmp_path / "promot", tiny_llama(tokenizer),
                 tokenizer)

    assert [evaluation_tags["epoch"] for _, _, evaluation_tags, _ in evaluated] == ([1, 1] if with_prompt else [1])
    adapter, unit, tags, adapter_weights = evaluated[0]
    assert not isinstance(adapter, promot.SoftPromptedLM) and "soft_prompt" not in unit | tags, \
        "the checkpoint's main evaluation has the prompt attached"
    base_weights = runner.eval_model.state_dict()
    assert any(not torch.equal(weight, base_weights[name]) for name, weight in adapter_weights.items()), \
        "the checkpoint was evaluated without its adapter"
    if with_prompt:
        prompted, unit, tags, prompted_weights = evaluated[1]
        assert isinstance(prompted, promot.SoftPromptedLM), "evaluate_with_prompt did not put the prompt back"
        assert torch.equal(prompted.prompt.cpu(), prompt.embeddings)
        inner = {name.removeprefix("model."): weight for name, weight in prompted_weights.items() if name != "prompt"}
        assert inner.keys() == adapter_weights.keys() and all(torch.equal(inner[name], adapter_weights[name])
                                                              for name in inner), "the prompt sits on another model"
        assert unit["soft_prompt"] is True and tags["soft_prompt"] is True


def test_bad_inputs_are_one_line_errors(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    with pytest.raises(promot.PromotError, match="exceeds the model's context of 512"):
        promot.check_prompt_length(model, 500, 64)
    with pytest.raises(promot.PromotError, match="stage-1 prompt not found"):
        promot.SoftPrompt.load(tmp_path / "nowhere")
    promot.SoftPrompt(torch.zeros(4, 32), {"model": "other", "model_digest": "aaa"}).save(tmp_path / "p")
    with pytest.raises(promot.PromotError, match="trained on model 'other'"):
        promot.SoftPrompt.load(tmp_path / "p", expect_model_digest="bbb")
    meta = json.loads((tmp_path / "p" / promot.META_FILE).read_text())
    (tmp_path / "p" / promot.META_FILE).write_text(json.dumps({**meta, "sha256": "0" * 16}))
    with pytest.raises(promot.PromotError, match="does not match the checksum"):
        promot.SoftPrompt.load(tmp_path / "p")
    for bad, path in (({"prompt_length": 0}, "train.promot.prompt_length"),
                      ({"stage1": {"epochs": 0}}, "train.promot.stage1.epochs"),
                      ({"init": "text"}, "train.promot")):
        with pytest.raises(HarnessError, match=path.replace(".", r"\.")):
            parse_config({"name": "x", "model": "m", "train": {"methods": ["promot"], "promot": bad}})


def test_stage1_step_count_handles_fractional_epochs():
    assert promot.stage1_steps(1425, 16, 2, 0.5) == 23  # Study B: half of 45 steps, rounded up
    assert promot.stage1_steps(3, 16, 2, 0.1) == 1


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: the GPU failure of issue 12, where the loss stayed finite at the step
    whose gradient was not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_stops_training_at_its_step(tokenizer, rows, tmp_path):
    model = tiny_llama(tokenizer)
    calls = []

    def poison_second_step(module, args, output):
        calls.append(1)
        if len(calls) != 2:
            return output
        if isinstance(output, tuple):
            return (_NanGradient.apply(output[0]), *output[1:])
        return _NanGradient.apply(output)

    model.model.layers[0].register_forward_hook(poison_second_step)
    run = RecordingRun()
    with pytest.raises(TrainingDiverged, match="grad_norm became nan at step 2"):
        promot.train_stage1(model, tokenizer, rows, settings(epochs=1.5), TRAIN, seed=0,
                            output_dir=tmp_path / "stage1", run=run, meta={"model": "tiny", "model_digest": "d1"})
    losses = [m["train_loss"] for _, m in run.metrics if "train_loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)  # the loss alone would not have shown it


def test_micro_batches_train_the_same_adapter_as_whole_batches(tokenizer, rows, tmp_path, monkeypatch):
    """HARNESS_PROMOT_MICRO_BATCH (issue 12: ProMoT in fp32 did not fit at batch 16) only splits each batch:
    the same examples per optimizer step, the same token-normalised loss, so the same adapter."""
    train = TRAIN.model_copy(update={"batch_size": 4, "grad_accum": 1, "epochs": 1,
                                     "lora": TRAIN.lora.model_copy(update={"dropout": 0.0})})
    prompt = promot.SoftPrompt(promot.initial_prompt(tiny_llama(tokenizer), tokenizer, 8, "random", None, seed=1), {})
    adapters = {}
    for micro in (None, "2"):
        if micro:
            monkeypatch.setenv("HARNESS_PROMOT_MICRO_BATCH", micro)
        run = RecordingRun()
        (last,) = promot.train_stage2(tiny_llama(tokenizer), tokenizer, rows[:8], [], prompt, train, seed=0,
                                      output_dir=tmp_path / f"micro-{micro}", run=run)[-1:]
        from safetensors.torch import load_file

        adapters[micro] = load_file(last.path / "adapter_model.safetensors")
        assert run.tags["harness.promot_micro_batch"] == (micro or "off")
    assert adapters[None].keys() == adapters["2"].keys()
    for name, tensor in adapters[None].items():
        torch.testing.assert_close(adapters["2"][name], tensor, rtol=1e-4, atol=1e-6)
    monkeypatch.setenv("HARNESS_PROMOT_MICRO_BATCH", "3")
    with pytest.raises(promot.PromotError, match="must divide train.batch_size 4"):
        promot.micro_batching(4, 1)
