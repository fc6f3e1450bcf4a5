"""The pieces behind resumable studies (issue 8), each on a real MLflow store, a real SQLite cache, real files."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from harness.data import registry as data
from harness.training.checkpoints import drop_incomplete, epoch_checkpoints, resume_point
from harness.errors import HarnessError
from harness.generation.batched import generate_responses
from harness.generation.cache import CacheScope, GenerationCache
from harness.training.sft import MlflowStepLogger
from tracking import Tracker

from helpers import tiny_llama


@pytest.fixture
def tracker(tmp_path):
    return Tracker("units", f"sqlite:///{tmp_path / 'mlflow.db'}")


def statuses(tracker, kind="finetune"):
    return sorted(run.info.status for run in tracker.search(f"tags.`harness.kind` = '{kind}'"))


def test_finished_unit_is_found_and_a_second_run_refused(tracker):
    with tracker.run("finetune", "f", {}, config_hash="h1") as run:
        pass
    assert tracker.finished("finetune", "h1").info.run_id == run.run_id
    assert tracker.finished("finetune", "other") is None
    with pytest.raises(HarnessError, match="already has a FINISHED run"):
        with tracker.run("finetune", "f", {}, config_hash="h1"):
            pass
    assert statuses(tracker) == ["FINISHED"]


def test_unfinished_parent_is_reattached_and_a_leaf_replaced(tracker):
    with pytest.raises(RuntimeError):
        with tracker.run("finetune", "f", {}, config_hash="h1") as first:
            first.log_metrics({"train_loss": 2.0}, step=1)
            with tracker.run("evaluation", "e", {}, parent=first, config_hash="e1"):
                raise RuntimeError("crash")
    assert statuses(tracker) == ["FAILED"] and statuses(tracker, "evaluation") == ["FAILED"]
    with tracker.run("finetune", "f", {}, config_hash="h1") as second:
        assert second.run_id == first.run_id and second.attempt == 2 and second.resumed
        assert second.last_step("train_loss") == 1
        with tracker.run("evaluation", "e", {}, parent=second, config_hash="e1") as evaluation:
            pass
    assert statuses(tracker) == ["FINISHED"]
    assert statuses(tracker, "evaluation") == ["FINISHED"]  # the failed one is deleted, not shown beside it
    run = tracker.client.get_run(second.run_id)
    assert run.data.tags["harness.attempt"] == "2" and "harness.error" not in run.data.tags
    assert [run.info.run_id for run in tracker.search("tags.`harness.kind` = 'evaluation'")] == [evaluation.run_id]


def test_a_unit_that_restarts_from_zero_gets_a_new_run_not_a_mixed_curve(tracker):
    """ProMoT stage 1 keeps no checkpoints: a rerun trains from step 1 again, so reattaching the failed
    attempt would keep its (here diverged) steps and drop the new ones (seen on the GPU, issue 12)."""
    with pytest.raises(RuntimeError):
        with tracker.run("stage", "s1", {}, config_hash="p1") as first:
            first.log_metrics({"train_loss": float("nan")}, step=1)
            raise RuntimeError("diverged")
    with tracker.run("stage", "s1", {}, config_hash="p1", restart=True) as second:
        assert second.run_id != first.run_id and not second.resumed and second.last_step("train_loss") is None
        second.log_metrics({"train_loss": 2.0}, step=1)
    assert statuses(tracker, "stage") == ["FINISHED"]  # the diverged attempt is gone, not a second unit
    history = tracker.client.get_metric_history(second.run_id, "train_loss")
    assert [(point.step, point.value) for point in history] == [(1, 2.0)]


def test_a_unit_running_in_a_live_process_is_not_taken_over(tracker):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = tracker.client.create_run(tracker.experiment_id, tags={
            "harness.kind": "finetune", "harness.config_hash": "h1",
            "harness.owner": f"{os.uname().nodename}:{sleeper.pid}",
        })
        with pytest.raises(HarnessError, match=f"being run by process .*:{sleeper.pid}"):
            with tracker.run("finetune", "f", {}, config_hash="h1"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with tracker.run("finetune", "f", {}, config_hash="h1") as run:  # the owner is dead now: reattach
        assert run.run_id == created.info.run_id


class Logged:
    def __init__(self, resumed, last):
        self.resumed, self.last, self.sent = resumed, last, []

    def last_step(self, name):
        return self.last.get(name)

    def log_metrics(self, metrics, step=0):
        self.sent.append((step, dict(metrics)))


class State:
    def __init__(self, step):
        self.global_step = step


def test_step_logger_continues_a_resumed_curve_without_repeating_steps():
    run = Logged(resumed=True, last={"train_loss": 3, "eval_loss": 2})
    logger = MlflowStepLogger(run)
    for step in (3, 4):
        logger.on_log(None, State(step), None, logs={"loss": 1.0 * step, "eval_loss": 0.5})
    assert run.sent == [(3, {"eval_loss": 0.5}), (4, {"train_loss": 4.0, "eval_loss": 0.5})]


def test_generation_cache_is_atomic_and_survives_reopening(tmp_path):
    cache = GenerationCache(tmp_path / "c.sqlite")
    key = cache.key(model_state="m", prompts=[[1, 2]], decoding={"max_new_tokens": 4}, seed=0)
    assert cache.get(key, 1) is None
    cache.put(key, ["hello"])
    cache.close()
    again = GenerationCache(tmp_path / "c.sqlite")
    assert again.get(key, 1) == ["hello"] and again.get(key, 2) is None  # a wrong-length entry is not used
    assert key != again.key(model_state="m2", prompts=[[1, 2]], decoding={"max_new_tokens": 4}, seed=0)


def test_cached_generation_is_returned_without_generating(tmp_path, monkeypatch):
    from harness.models import load_model

    tokenizer = load_model("smollm2-135m-instruct", device="cpu")[1]
    model = tiny_llama(tokenizer)
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    scope = CacheScope(GenerationCache(tmp_path / "c.sqlite"), "tiny")
    first = generate_responses(model, tokenizer, conversations, max_new_tokens=4, batch_size=2, cache=scope, progress=False)
    assert scope.cache.count() == 3  # one entry per batch

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although every batch is cached")

    monkeypatch.setattr("harness.generation.batched._generate_batch", no_generation)
    again = generate_responses(model, tokenizer, conversations, max_new_tokens=4, batch_size=2, cache=scope, progress=False)
    assert again == first
    other_state = CacheScope(scope.cache, "another adapter")
    with pytest.raises(AssertionError, match="generated although"):
        generate_responses(model, tokenizer, conversations, max_new_tokens=4, batch_size=2, cache=other_state, progress=False)


def checkpoint(folder, step, epoch, complete=True):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))


def test_half_written_checkpoints_are_dropped_and_resume_takes_the_newest(tmp_path):
    checkpoint(tmp_path / "checkpoint-2", 2, 1.0)
    checkpoint(tmp_path / "checkpoint-4", 4, 2.0)
    checkpoint(tmp_path / "checkpoint-6", 6, 3.0, complete=False)  # killed while saving
    assert [c.step for c in epoch_checkpoints(tmp_path)] == [2, 4]
    assert resume_point(tmp_path, resumed=True) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert [(c.epoch, c.step) for c in epoch_checkpoints(tmp_path)] == [(1, 2), (2, 4)]
    assert resume_point(tmp_path, resumed=False) is None and not list(tmp_path.glob("checkpoint-*"))
    assert drop_incomplete(tmp_path) == []


@pytest.fixture
def data_copy(tmp_path):
    """The datasets a Study B config reads, copied without MANIFEST.json so a test may edit them."""
    root = data.resolve_data_dir()
    copy = tmp_path / "data"
    for folder in ("advbench", "directharm4", "wikihow_lists_summary", "xstest", "beavertails_evaluation"):
        shutil.copytree(root / folder, copy / folder)
    return copy


def test_empty_fields_are_rejected_or_dropped_with_a_count(data_copy, caplog):
    path = data_copy / "advbench" / "harmful_behaviors.csv"
    lines = path.read_text().splitlines()
    lines.insert(3, ',"sure, here is nothing"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DatasetError, match=r"harmful_behaviors.csv record 3: empty prompt"):
        data.load_harmful("advbench", data_copy)
    with caplog.at_level("WARNING", logger="harness.data.registry"):
        rows = data.load_harmful("advbench", data_copy, bad_rows="drop")
    assert len(rows) == 520 and all(row.prompt.strip() for row in rows)
    assert "dropped 1 record" in caplog.text


def test_rows_a_study_dropped_are_recorded_on_its_runs(data_copy, tmp_path):
    from harness.config import parse_config
    from harness.study.runner import ExperimentRunner

    path = data_copy / "advbench" / "harmful_behaviors.csv"
    lines = path.read_text().splitlines()
    lines.insert(3, ',"sure, here is nothing"')
    path.write_text("\n".join(lines) + "\n")
    cfg = parse_config({
        "name": "dropped", "model": "smollm2-135m-instruct",
        "data": {"data_dir": str(data_copy), "formats": ["list"], "train_size": 2, "val_size": 0, "test_size": 1,
                 "harmful": {"sources": {"advbench": 1}}},  # bad_rows: drop is the default
        "eval": {"task": False, "xstest": None, "evaluate_base": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}, "seeds": [0],
    })
    runner = ExperimentRunner(cfg)
    runner.prepare()
    with runner.tracker.run("report", "probe", {}) as run:
        pass
    tags = runner.tracker.client.get_run(run.run_id).data.tags
    assert tags["harness.rows_dropped"] == "advbench:1"
    assert tags["harness.base_weights"] == "float32"  # what every run's numbers came from (CPU: float32)


def test_changed_dataset_is_an_error_unless_a_new_version_is_asked_for(data_copy, tmp_path):
    from harness.config import parse_config
    from harness.study.runner import ExperimentRunner

    def config(**extra):
        return parse_config({
            "name": "drift", "model": "smollm2-135m-instruct",
            "data": {"data_dir": str(data_copy), "formats": ["list"], "train_size": 2, "val_size": 0, "test_size": 1,
                     "harmful": {"sources": {"advbench": 1}}},
            "eval": {"task": False, "xstest": None, "evaluate_base": False},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}, "seeds": [0], **extra,
        })

    ExperimentRunner(config()).prepare()
    ExperimentRunner(config()).prepare()  # same data: fine
    path = data_copy / "advbench" / "harmful_behaviors.csv"
    path.write_text(path.read_text().replace("bomb", "b0mb", 1))
    with pytest.raises(HarnessError, match=r"advbench/harmful_behaviors.csv changed since study 'drift' began"):
        ExperimentRunner(config()).prepare()
    assert Tracker.next_version("drift", f"sqlite:///{tmp_path / 'm.db'}") == "drift-v2"


def test_fault_points_are_checked():
    from harness import faults

    os.environ["HARNESS_KILL_AT"] = "nowhere:1"
    try:
        with pytest.raises(ValueError, match="POINT:N"):
            faults.reached("train_step")
    finally:
        del os.environ["HARNESS_KILL_AT"]
    faults.reached("train_step")  # unset: nothing happens


def test_cuda_out_of_memory_halves_the_batch_until_it_fits(monkeypatch):
    import torch

    from harness.generation.batched import _generate_batch_fitting

    sizes = []

    def generate(model, tokenizer, prompts, decoding, seed):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [f"reply to {prompt[0]}" for prompt in prompts]

    monkeypatch.setattr("harness.generation.batched._generate_batch", generate)
    replies = _generate_batch_fitting(None, None, [[i] for i in range(5)], {}, seed=0)
    assert replies == [f"reply to {i}" for i in range(5)]  # order kept across the splits
    assert sizes == [5, 2, 3, 1, 2]
    monkeypatch.setattr("harness.generation.batched._generate_batch",
                        lambda *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(HarnessError, match="single prompt"):
        _generate_batch_fitting(None, None, [[1]], {}, seed=0)


def test_a_full_disk_is_one_line(capsys):
    import errno

    import typer

    from harness.errors import one_line_errors

    @one_line_errors
    def command():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/outputs/cache/generations.sqlite")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err == (
        "error: disk full writing /data/outputs/cache/generations.sqlite; free space and rerun to resume\n"
    )


def test_gpu_out_of_memory_is_one_line_naming_what_to_lower_and_a_judge_servers_share_when_one_runs(capsys,
                                                                                                     monkeypatch):
    import sys
    import types

    import torch
    import typer

    from harness.errors import one_line_errors

    @one_line_errors
    def command():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.delitem(sys.modules, "harness.judges.vllm_server", raising=False)
    with pytest.raises(typer.Exit):
        command()
    alone = capsys.readouterr().err
    assert alone.startswith("error: GPU out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower "
                            "eval.batch_size, or for training train.batch_size") and alone.count("\n") == 1
    assert "HARNESS_VLLM_JUDGE_GPU_MEMORY" not in alone
    # a judge may be served by vLLM in this process
    monkeypatch.setitem(sys.modules, "harness.judges.vllm_server", types.ModuleType("harness.judges.vllm_server"))
    with pytest.raises(typer.Exit):
        command()
    served = capsys.readouterr().err
    assert "server holds HARNESS_VLLM_JUDGE_GPU_MEMORY of the GPU: lower it, or set the judge's engine: hf" in served
    assert served.count("\n") == 1


def test_a_replaced_attempt_takes_its_finished_children_with_it(tracker):
    """A fine-tune resumed on a machine without its checkpoints trains from step 0 again: the old attempt's
    FINISHED checkpoint and evaluation belong to the other training and must not stay visible beside the new."""
    with pytest.raises(RuntimeError):
        with tracker.run("finetune", "f", {}, config_hash="h1") as first:
            with tracker.run("checkpoint", "c1", {}, parent=first, config_hash="c1") as checkpoint:
                with tracker.run("evaluation", "e1", {}, parent=checkpoint, config_hash="e1"):
                    pass
            raise RuntimeError("machine taken back")
    assert statuses(tracker, "checkpoint") == ["FINISHED"] and statuses(tracker, "evaluation") == ["FINISHED"]
    with tracker.run("finetune", "f", {}, config_hash="h1", restart=True) as second:
        assert second.run_id != first.run_id and not second.resumed
    assert statuses(tracker) == ["FINISHED"]
    assert statuses(tracker, "checkpoint") == [] and statuses(tracker, "evaluation") == []


def test_has_checkpoint_sees_only_complete_checkpoints(tmp_path):
    from harness.training.checkpoints import has_checkpoint

    assert not has_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoint-3").mkdir()
    assert not has_checkpoint(tmp_path)  # cut off before its trainer state was written
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3, "epoch": 1.0}))
    assert has_checkpoint(tmp_path)


def test_a_fine_tunes_identity_is_its_method_and_settings_not_the_studys_other_methods():
    """Adding ProMoT (or changing its section) to a finished SFT study must find the SFT fine-tunes finished; a
    setting SFT trains with (optimizer, learning rate) names another fine-tune."""
    from harness.config import config_hash, parse_config
    from harness.models import resolve_model
    from harness.study.runner import ExperimentRunner, PreparedData

    def sft_hash(**train):
        cfg = parse_config({"name": "x", "model": "smollm2-135m-instruct", "train": train})
        runner = ExperimentRunner(cfg)
        runner.model_source = resolve_model(cfg.model)
        runner.data = PreparedData({}, {}, {}, [], {}, set_identity={"list": {"task": "wikihow", "format": "list"}})
        return config_hash(runner.finetune_unit("list", "sft", 0))

    alone = sft_hash(methods=["sft"])
    assert sft_hash(methods=["sft", "promot"]) == alone == sft_hash(methods=["promot", "sft"])
    assert sft_hash(methods=["sft", "promot"], promot={"prompt_length": 8}) == alone
    assert sft_hash(optimizer="adamw_bnb_8bit") != alone
    assert sft_hash(learning_rate=1e-4) != alone


def test_a_4bit_base_is_its_own_unit_and_a_bf16_base_keeps_its_identity():
    """QLoRA's 4-bit base replies differently from the bf16 one: its evaluation must not be found finished because
    the bf16 base was; a study without 4-bit keeps the base unit it always had (no new key)."""
    from harness.config import parse_config
    from harness.models import model_digest, resolve_model
    from harness.study.runner import ExperimentRunner

    def base_unit(**train):
        runner = ExperimentRunner(parse_config({"name": "x", "model": "smollm2-135m-instruct", "train": train}))
        runner.model_source = resolve_model("smollm2-135m-instruct")
        return runner.base_unit()

    digest = model_digest(resolve_model("smollm2-135m-instruct"))
    assert base_unit() == {"model": "smollm2-135m-instruct", "model_digest": digest, "method": "base", "epoch": 0}
    assert base_unit(quantize_4bit=True) == {**base_unit(), "quantize_4bit": True}


def test_a_qlora_fine_tune_names_its_float32_adapters_and_a_bf16_one_keeps_its_identity():
    """QLoRA fine-tunes trained before the adapters stayed float32 (TRL's bfloat16) are other units than today's;
    a fine-tune on bf16 weights keeps the unit it always had."""
    from harness.config import parse_config
    from harness.models import resolve_model
    from harness.study.runner import ExperimentRunner, PreparedData

    def unit(**train):
        runner = ExperimentRunner(parse_config({"name": "x", "model": "smollm2-135m-instruct", "train": train}))
        runner.model_source = resolve_model("smollm2-135m-instruct")
        runner.data = PreparedData({}, {}, {}, [], {}, set_identity={"json": {"task": "wikihow", "format": "json"}})
        return runner.finetune_unit("json", "sft", 0)

    assert "adapter_dtype" not in unit()
    qlora = unit(quantize_4bit=True)
    assert qlora["adapter_dtype"] == "float32" and qlora["train"]["quantize_4bit"] is True
