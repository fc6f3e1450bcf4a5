"""The config's `runtime:` section (harness/runtime.py): how a run computes, with environment overrides.

What must hold: the defaults are the settings the harness has always used (fp32 + SDPA ProMoT, no micro-batches,
both fast paths on); the YAML section is validated like every other, naming the bad field; a set environment
variable wins over the config and the run's tags say so; a bad environment value is one line naming the
variable; and the code that decides the fast paths and ProMoT's numerics reads the activated runtime.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import runtime
from harness.training import promot
from harness.config import ExperimentConfig, RuntimeConfig, load_config, parse_config
from harness.errors import HarnessError
from harness.training.fast_training import fast_training_unavailable
from harness.generation.batched import fast_path_unavailable
from tracking.schema import Tag


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    """No override from the shell running the tests, and no runtime left activated by a test."""
    for variable in runtime.ENV.values():
        monkeypatch.delenv(variable, raising=False)
    previous = runtime.activate(None)
    yield
    runtime.activate(previous)


def write_config(tmp_path, runtime_yaml: str):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: x\nmodel: m\ntrain:\n  batch_size: 8\nruntime:\n{runtime_yaml}")
    return path


def test_defaults_are_the_settings_used_before_the_section_existed():
    assert RuntimeConfig().model_dump() == {"promot_precision": "fp32", "promot_attention": "sdpa",
                                            "promot_micro_batch": None, "fast_training": True,
                                            "fast_generation": True}
    assert parse_config({"name": "x", "model": "m"}).runtime == RuntimeConfig()
    assert runtime.current() == runtime.Runtime()  # nothing activated, nothing in the environment
    tags = runtime.current().tags()
    assert tags[Tag.RUNTIME_OVERRIDES.key] == "none"
    assert json.loads(tags[Tag.RUNTIME.key]) == RuntimeConfig().model_dump()
    assert (tags[Tag.PROMOT_PRECISION.key], tags[Tag.PROMOT_ATTENTION.key], tags[Tag.PROMOT_MICRO_BATCH.key]) == (
        "fp32", "sdpa", "off")
    assert set(runtime.ENV) == set(RuntimeConfig.model_fields)  # every setting has its variable


def test_yaml_section_is_validated(tmp_path):
    cfg = load_config(write_config(tmp_path, "  promot_precision: bf16\n  promot_micro_batch: 4\n"
                                             "  fast_generation: false\n"))
    assert (cfg.runtime.promot_precision, cfg.runtime.promot_micro_batch, cfg.runtime.fast_generation) == (
        "bf16", 4, False)
    with pytest.raises(HarnessError, match=r"runtime\.promot_precision: .*'fp32' or 'bf16' \(got 'fp16'\)"):
        load_config(write_config(tmp_path, "  promot_precision: fp16\n"))
    with pytest.raises(HarnessError, match=r"runtime\.promot_micro_batch: 3 must divide train\.batch_size 8"):
        load_config(write_config(tmp_path, "  promot_micro_batch: 3\n"))
    with pytest.raises(HarnessError, match=r"runtime\.promot_micro_batch: .*greater than or equal to 1"):
        load_config(write_config(tmp_path, "  promot_micro_batch: 0\n"))
    with pytest.raises(HarnessError, match=r"runtime\.fast_training_path: unknown key"):
        load_config(write_config(tmp_path, "  fast_training_path: false\n"))
    with pytest.raises(ValueError, match=r"runtime\.promot_micro_batch: 3 must divide train\.promot\.stage1\."):
        ExperimentConfig(name="x", model="m", train={"batch_size": 6}, runtime={"promot_micro_batch": 3})


def test_environment_overrides_the_config_and_is_recorded(monkeypatch):
    settings = RuntimeConfig(promot_precision="bf16", promot_micro_batch=4, fast_generation=False)
    monkeypatch.setenv("HARNESS_PROMOT_PRECISION", "fp32")
    monkeypatch.setenv("HARNESS_FAST_TRAINING", "No")
    monkeypatch.setenv("HARNESS_PROMOT_ATTENTION", "")  # empty is unset, as before
    resolved = runtime.resolve(settings)
    assert (resolved.promot_precision, resolved.fast_training) == ("fp32", False)  # from the environment
    assert (resolved.promot_micro_batch, resolved.fast_generation, resolved.promot_attention) == (4, False, "sdpa")
    tags = resolved.tags()
    assert tags[Tag.RUNTIME_OVERRIDES.key] == "HARNESS_PROMOT_PRECISION,HARNESS_FAST_TRAINING"
    assert json.loads(tags[Tag.RUNTIME.key]) == {"promot_precision": "fp32", "promot_attention": "sdpa",
                                                 "promot_micro_batch": 4, "fast_training": False,
                                                 "fast_generation": False}
    assert tags[Tag.PROMOT_MICRO_BATCH.key] == "4"
    assert tags[Tag.FAST_TRAINING.key] == "off: switched off by HARNESS_FAST_TRAINING"
    assert tags[Tag.FAST_GENERATION.key] == "off: switched off by runtime.fast_generation"
    assert runtime.resolve(settings).tags()[Tag.PROMOT_PRECISION.key] == "fp32"
    monkeypatch.setenv("HARNESS_PROMOT_MICRO_BATCH", "off")  # switches a configured split off
    assert runtime.resolve(settings).promot_micro_batch is None


def test_bad_environment_value_is_one_line_naming_the_variable(monkeypatch):
    for variable, value, allowed in [("HARNESS_PROMOT_PRECISION", "fp16", "fp32, bf16"),
                                     ("HARNESS_PROMOT_ATTENTION", "flash", "sdpa, eager"),
                                     ("HARNESS_PROMOT_MICRO_BATCH", "0", "a positive integer"),
                                     ("HARNESS_FAST_GENERATION", "maybe", "1, 0, true, false, yes, no, on, off")]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(HarnessError) as error:
            runtime.resolve(RuntimeConfig())
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{variable}='{value}'") and allowed in message
        with pytest.raises(HarnessError, match=variable):
            runtime.current()  # nothing activated: library code sees the environment, bad values included
        monkeypatch.delenv(variable)


def test_current_is_the_activated_runtime_else_the_environment(monkeypatch):
    monkeypatch.setenv("HARNESS_FAST_GENERATION", "0")
    assert runtime.current().fast_generation is False  # read at the call, as os.environ was
    active = runtime.resolve(RuntimeConfig(promot_attention="eager"))
    with runtime.activated(active):
        monkeypatch.setenv("HARNESS_FAST_GENERATION", "1")  # after activation the environment no longer counts
        assert runtime.current() is active and runtime.current().fast_generation is False
    assert runtime.current().fast_generation is True  # deactivated again


def test_fast_generation_switch_reads_the_runtime(monkeypatch):
    model = torch.nn.Linear(2, 2)
    runtime.activate(runtime.resolve(RuntimeConfig(fast_generation=False)))
    assert fast_path_unavailable(model) == "switched off by runtime.fast_generation"
    runtime.activate(runtime.resolve(RuntimeConfig()))
    assert fast_path_unavailable(model) == "not on CUDA"  # on: the next check, the model's device, decides
    monkeypatch.setenv("HARNESS_FAST_GENERATION", "off")
    runtime.activate(runtime.resolve(RuntimeConfig()))
    assert fast_path_unavailable(model) == "switched off by HARNESS_FAST_GENERATION"


def test_fast_training_switch_reads_the_runtime(monkeypatch):
    on = None if torch.cuda.is_available() else "not on CUDA"
    runtime.activate(runtime.resolve(RuntimeConfig(fast_training=False)))
    assert fast_training_unavailable() == "switched off by runtime.fast_training"
    assert runtime.current().tags()[Tag.FAST_TRAINING.key] == "off: switched off by runtime.fast_training"
    monkeypatch.setenv("HARNESS_FAST_TRAINING", "yes")  # overrides the config's false
    runtime.activate(runtime.resolve(RuntimeConfig(fast_training=False)))
    assert fast_training_unavailable() == on
    assert fast_training_unavailable(runtime.Runtime(fast_training=False)) == "switched off by runtime.fast_training"


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_promot_numerics_read_the_runtime(monkeypatch):
    """ProMoT's precision, attention and micro-batches come from the activated runtime. `cuda_numerics` reads
    only whether CUDA is there, so off a GPU it is told so and runs on the CPU model (TF32 flags restored)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        check_promot_numerics(monkeypatch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def check_promot_numerics(monkeypatch):
    model = tiny_model()
    runtime.activate(runtime.resolve(RuntimeConfig(promot_precision="bf16", promot_attention="eager",
                                                   promot_micro_batch=2)))
    assert promot.cuda_numerics(model) == {Tag.PROMOT_PRECISION.key: "bf16", Tag.PROMOT_ATTENTION.key: "eager",
                                           Tag.PROMOT_MICRO_BATCH.key: "2"}
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert promot.micro_batching(8, 1) == (2, 4)
    runtime.activate(runtime.resolve(RuntimeConfig()))
    assert promot.cuda_numerics(model)[Tag.PROMOT_PRECISION.key] == "fp32"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert promot.micro_batching(8, 1) == (8, 1)
    monkeypatch.setenv("HARNESS_PROMOT_MICRO_BATCH", "3")  # an override the config could not check
    runtime.activate(runtime.resolve(RuntimeConfig()))
    with pytest.raises(promot.PromotError, match="HARNESS_PROMOT_MICRO_BATCH=3 must divide train.batch_size 8"):
        promot.micro_batching(8, 1)
