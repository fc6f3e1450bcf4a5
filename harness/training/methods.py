"""Training methods as recipes: each one turns a training set into epoch checkpoints under its own runs.

A recipe (in the way torchtune's are) says what of `train:` identifies its fine-tune, checks what only a loaded
model can check, trains (making whatever nested runs it needs), and hands every epoch's checkpoint to the
runner for evaluation. The runner knows no method by name: it looks the recipe up in `TRAINING_METHODS`, the
registry the config's `train.methods` names are checked against. Adding a method is one class here.

- `sft`: LoRA supervised fine-tuning with TRL (harness/training/sft.py); checkpoints hang under the `finetune` run.
- `promot`: ProMoT (Wang et al. 2024; harness/training/promot.py): stage 1 trains a soft prompt on the frozen model, stage
  2 trains LoRA with that prompt frozen and prepended, as two nested `stage` runs; checkpoints hang under stage 2
  and are evaluated without the prompt (with it too when `train.promot.evaluate_with_prompt`).

Model-stack imports (torch, TRL) happen inside the methods, so the config can import this registry cheaply.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from harness.training.checkpoints import has_checkpoint
from tracking.schema import Kind, Tag


def config_hash(data: dict) -> str:
    from harness.config import config_hash as digest  # the config imports this registry: look it up late

    return digest(data)


class TrainingMethod:
    """One training method; see the module doc. `runner` is the study's `pipeline.ExperimentRunner`."""

    name: ClassVar[str]
    uses_fast_training: ClassVar[bool] = False

    def train_identity(self, train) -> dict:
        """The `train:` settings that identify this method's fine-tune: no other method's own section."""
        others = {method.name for method in TRAINING_METHODS.values() if method is not type(self)}
        return train.model_dump(mode="json", exclude=others & set(type(train).model_fields))

    def check(self, runner) -> None:
        """Inputs only a loaded model can check, before any run is made."""

    def restart(self, output_dir: Path) -> bool:
        """Whether an unfinished fine-tune run must be replaced rather than reattached: with no checkpoint on
        disk, training starts from step 0, and a reattached run would mix two loss curves."""
        return not has_checkpoint(output_dir)

    def train(self, runner, run, unit: dict, tags: dict, output_dir: Path, model, tokenizer) -> None:
        raise NotImplementedError

    def evaluation_prompt(self, runner, finetune_run, tags: dict) -> Callable[[], object | None]:
        """For a fine-tune trained earlier: what to attach when its checkpoints are evaluated again (lazily)."""
        return lambda: None


class SupervisedFineTuning(TrainingMethod):
    name = "sft"
    uses_fast_training = True

    def train(self, runner, run, unit, tags, output_dir, model, tokenizer):
        from harness.training.sft import train_sft

        key = training_set_key(tags)
        checkpoints = train_sft(model, tokenizer, runner.data.train[key], runner.data.val[key], runner.cfg.train,
                                seed=tags["seed"], output_dir=output_dir, run=run)
        del model
        gc.collect()
        runner.evaluate_checkpoints(run, unit, tags, checkpoints)


class ProMoT(TrainingMethod):
    name = "promot"

    def restart(self, output_dir):
        return False  # stage 1 and stage 2 are their own runs and restart themselves

    def check(self, runner):
        from harness.training import promot
        from harness.models import model_digest

        settings = runner.cfg.train.promot
        promot.check_prompt_length(runner.eval_model, settings.prompt_length, runner.cfg.train.max_length)
        if settings.prompt_path is not None:
            prompt = promot.SoftPrompt.load(settings.prompt_path, expect_model_digest=model_digest(runner.model_source))
            hidden = runner.eval_model.get_input_embeddings().weight.shape[1]
            if prompt.embeddings.shape[1] != hidden:
                raise promot.PromotError(
                    f"stage-1 prompt {settings.prompt_path} has width {prompt.embeddings.shape[1]}, the model {hidden}")

    def train(self, runner, run, unit, tags, output_dir, model, tokenizer):
        """Stage 1 (or a finished one reused), then stage 2 as a nested run; checkpoints hang under stage 2."""
        from harness.training import promot

        cfg, key, seed = runner.cfg, training_set_key(tags), tags["seed"]
        prompt = self.stage1_prompt(runner, run, tags, model, tokenizer)
        stage2_unit = {**unit, "stage": 2}
        with runner.tracker.run(Kind.STAGE, f"promot-{key}-seed{seed}-stage2", {**tags, Tag.STAGE: 2}, parent=run,
                                config=stage2_unit, config_hash=config_hash(stage2_unit),
                                restart=not has_checkpoint(output_dir / "stage2")) as stage2_run:
            checkpoints = promot.train_stage2(model, tokenizer, runner.data.train[key], runner.data.val[key], prompt,
                                              cfg.train, seed=seed, output_dir=output_dir / "stage2", run=stage2_run)
            del model
            gc.collect()
            runner.evaluate_checkpoints(stage2_run, unit, tags, checkpoints,
                                        prompt=prompt if cfg.train.promot.evaluate_with_prompt else None)

    def evaluation_prompt(self, runner, finetune_run, tags):
        if not runner.cfg.train.promot.evaluate_with_prompt:
            return lambda: None
        found = []

        def prompt():
            if not found:
                found.append(self.stage1_prompt(runner, finetune_run, tags))
            return found[0]

        return prompt

    # -- stage 1: shared by every fine-tune that differs only in stage-2 settings ---------------------------
    def stage1_unit(self, runner, key: str, seed: int) -> dict:
        """What ProMoT's stage 1 depends on and nothing else: a stage-2 setting (a sweep's learning rate, the
        LoRA rank, the epochs) must not retrain the soft prompt, so fine-tunes that differ only there share it."""
        unit = runner.finetune_unit(key, self.name, seed)
        train = runner.cfg.train
        unit["train"] = {"max_length": train.max_length, "quantize_4bit": train.quantize_4bit,
                         "promot": train.promot.model_dump(mode="json", exclude={"evaluate_with_prompt"})}
        return {**unit, "stage": 1}

    def stage1_dir(self, runner, key: str, seed: int, stage1_unit: dict) -> Path:
        return Path(runner.cfg.output_dir) / runner.cfg.name / f"promot-stage1-{key}-seed{seed}-{config_hash(stage1_unit)}"

    def stage1_prompt(self, runner, parent, tags: dict, model=None, tokenizer=None):
        """The soft prompt for (model, training set, seed, stage-1 settings): a FINISHED stage 1 anywhere in the
        study is reused and recorded on `parent` (`harness.prompt_source_run`); otherwise stage 1 is trained
        under it."""
        from harness.training import promot
        from harness.models import load_model

        key, seed = training_set_key(tags), tags["seed"]
        stage1_unit = self.stage1_unit(runner, key, seed)
        done = runner.tracker.finished(Kind.STAGE, config_hash(stage1_unit))
        if done is None:
            if model is None:
                model, tokenizer = load_model(runner.cfg.model, quantize_4bit=runner.cfg.train.quantize_4bit)
            return self.train_stage1(runner, parent, stage1_unit, tags, model, tokenizer)
        directory = Path(done.data.tags.get(Tag.PROMPT_DIR.key, ""))
        if not (directory / promot.PROMPT_FILE).is_file():  # trained on another machine: take the logged artifact
            directory = self.stage1_dir(runner, key, seed, stage1_unit) / "downloaded"
            directory.mkdir(parents=True, exist_ok=True)
            directory = Path(runner.tracker.client.download_artifacts(done.info.run_id, "soft_prompt", str(directory)))
        prompt = promot.SoftPrompt.load(directory, expect_model_digest=stage1_unit["model_digest"])
        if parent.run_id != done.data.tags.get("mlflow.parentRunId"):
            parent.set_tags({Tag.PROMPT_SOURCE_RUN.key: done.info.run_id, Tag.PROMPT_SOURCE.key: directory.resolve(),
                             Tag.PROMPT_SHA256.key: prompt_sha256(prompt)})
        return prompt

    def train_stage1(self, runner, parent, stage1_unit: dict, tags: dict, model, tokenizer):
        """Stage 1 as its own run: train the soft prompt (or take a saved one) and log it as an artifact."""
        from harness.training import promot

        cfg, key, seed = runner.cfg, training_set_key(tags), tags["seed"]
        output_dir = self.stage1_dir(runner, key, seed, stage1_unit)
        with runner.tracker.run(Kind.STAGE, f"promot-{key}-seed{seed}-stage1", {**tags, Tag.STAGE: 1}, parent=parent,
                                config=stage1_unit, config_hash=config_hash(stage1_unit), restart=True) as stage1_run:
            if cfg.train.promot.prompt_path is not None:
                prompt = promot.SoftPrompt.load(cfg.train.promot.prompt_path,
                                                expect_model_digest=stage1_unit["model_digest"])
                stage1_run.set_tags({Tag.PROMPT_SOURCE.key: cfg.train.promot.prompt_path.resolve()})
                prompt.save(output_dir)
            else:
                prompt = promot.train_stage1(
                    model, tokenizer, runner.data.train[key], cfg.train.promot, cfg.train, seed=seed,
                    output_dir=output_dir, run=stage1_run,
                    meta={"model": cfg.model, "model_digest": stage1_unit["model_digest"], "format": tags["format"]},
                )
            stage1_run.log_artifacts(str(output_dir), "soft_prompt")
            stage1_run.set_tags({Tag.PROMPT_SHA256.key: prompt_sha256(prompt), Tag.PROMPT_DIR.key: output_dir.resolve()})
        return prompt


def prompt_sha256(prompt) -> str:
    """The soft prompt's digest as saved (its meta), else computed: the same value on the run that trained it
    and on every run that reuses it."""
    from harness.training import promot

    return prompt.meta.get("sha256") or promot.tensor_digest(prompt.embeddings)


def training_set_key(tags: dict) -> str:
    """The training set a fine-tune's tags name: a format (Study B) or a dataset in its native format (Study A)."""
    return tags["format"] if tags["format"] != "native" else tags["dataset"]


TRAINING_METHODS: dict[str, type[TrainingMethod]] = {method.name: method for method in (SupervisedFineTuning, ProMoT)}
"""Every training method by its config name (`train.methods`), in the order a study trains them."""


def training_method(name: str) -> TrainingMethod:
    return TRAINING_METHODS[name]()
