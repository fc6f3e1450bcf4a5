"""The experiment pipeline: config → data → base evaluation → fine-tunes → per-epoch evaluation → MLflow.

Everything that can fail on bad input (config, datasets, models, judges, the S-BERT model) is prepared
*before* the first MLflow run is created, so a typo never leaves half-made runs behind.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import faults, runtime
from harness.data import registry as data
from harness.data import formats
from harness.data.user import declare_user_datasets
from harness.training import promot
from harness.config import ExperimentConfig, config_hash
from harness.errors import HarnessError
from harness.training.fast_training import fast_training_unavailable
from harness.evals.benchmarks import EvaluationSetup
from harness.evals.state import StateEvaluator
from harness.evals.scoring import refusal_judge
from harness.judges.validation import headline_judge, latest_validation, validation_tags
from harness.judges.registry import JudgeModels, build_judge
from harness.training.methods import training_method, training_set_key
from harness.generation.cache import GenerationCache, file_digest
from harness.generation.fast import unsupported_reason as fast_generation_unsupported
from harness.evals.metrics import task_metrics
from harness.models import (load_adapter, load_model, merge_for_evaluation, model_digest, resolve_model,
                            unload_adapter, weights_description)
from tracking import RunHandle, Tracker, resolve_tracking_uri
from tracking.datasets import TRAINING, file_record, registry_records
from tracking.schema import HARMFUL_MIX, SCHEMA_VERSION, WIKIHOW, XSTEST_SAFE, XSTEST_UNSAFE, ExperimentTag, Kind, Tag
from tracking.store import ui_command



@dataclass
class PreparedData:
    """Everything the study reads, loaded and checked up front."""

    train: dict[str, list[data.FinetuneRow]]
    val: dict[str, list[data.FinetuneRow]]
    test: dict[str, list[data.FinetuneRow]]
    harmful: list[data.HarmfulPrompt]
    checksums: dict[str, str]
    xstest_safe: list[data.HarmfulPrompt] = field(default_factory=list)
    xstest_unsafe: list[data.HarmfulPrompt] = field(default_factory=list)
    set_tags: dict[str, dict] = field(default_factory=dict)
    """Training-set key -> its `harness.dataset` / `harness.format` tags. Study B's keys are the formats of
    one task; Study A's are dataset names (`dolly15k`, `alpaca`, `dolly15k-selfgen`) in their native format."""
    set_identity: dict[str, dict] = field(default_factory=dict)
    """Training-set key -> what identifies its rows in a fine-tune's config hash (selection and checksums)."""


@dataclass
class SummaryRow:
    method: str
    format: str
    seed: int | None
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Every row the study reads, loaded, checked and checksummed; the YAML's own datasets are declared first, so
    their names work wherever a registry name does."""
    declare_user_datasets(cfg.data.datasets)
    if cfg.data.task == "instructions":
        return prepare_instruction_data(cfg)
    d = cfg.data
    procedures = data.load_procedures(d.data_dir, name=d.procedures, bad_rows=d.bad_rows)
    train, val, test = data.split(procedures, (d.train_size, d.val_size, d.test_size), seed=d.split_seed,
                                  what="data.train_size, val_size, test_size")
    rows = {
        part_name: {fmt: formats.build_task_rows(part, fmt) for fmt in d.formats}
        for part_name, part in (("train", train), ("val", val), ("test", test))
    }
    harmful, xstest = harmful_and_xstest(cfg)
    checksums = dataset_checksums([d.procedures, *d.harmful.sources], cfg)
    identity = {"task": d.task, "procedures": d.procedures, "train_size": d.train_size, "val_size": d.val_size,
                "test_size": d.test_size, "split_seed": d.split_seed, "checksums": data.checksums(d.procedures, d.data_dir)}
    return PreparedData(rows["train"], rows["val"], rows["test"], harmful, checksums, xstest["safe"], xstest["unsafe"],
                        set_tags={fmt: {"dataset": d.procedures, "format": fmt} for fmt in d.formats},
                        set_identity={fmt: {**identity, "format": fmt} for fmt in d.formats})


def dataset_checksums(sources: list[str], cfg: ExperimentConfig) -> dict[str, str]:
    """sha256 of every file behind the named datasets, XSTest included when it is evaluated."""
    sources = [*sources, *(["xstest"] if cfg.eval.xstest is not None else [])]
    checksums: dict[str, str] = {}
    for name in dict.fromkeys(sources):
        checksums.update(data.checksums(name, cfg.data.data_dir))
    return checksums


def evaluation_datasets(cfg: ExperimentConfig) -> dict[str, list]:
    """Benchmark -> the datasets its prompts are drawn from: the MLflow dataset inputs of its generation and
    evaluation runs (`Tracker.evaluation_inputs`)."""
    d = cfg.data
    sources = {HARMFUL_MIX: list(d.harmful.sources)}
    if cfg.eval.xstest is not None:
        sources[XSTEST_SAFE] = sources[XSTEST_UNSAFE] = ["xstest"]
    if d.task != "instructions":  # Study B's task prompts are the procedures' held-out test rows
        sources[WIKIHOW] = [d.procedures]
    return {benchmark: registry_records(names, d.data_dir) for benchmark, names in sources.items()}


def harmful_and_xstest(cfg: ExperimentConfig) -> tuple[list, dict[str, list]]:
    d = cfg.data
    harmful = data.harmful_mix(d.harmful.sources, seed=d.harmful.seed, data_dir=d.data_dir, bad_rows=d.bad_rows)
    xstest: dict[str, list[data.HarmfulPrompt]] = {"safe": [], "unsafe": []}
    if cfg.eval.xstest is not None:
        for label, count in (("safe", cfg.eval.xstest.safe), ("unsafe", cfg.eval.xstest.unsafe)):
            if count != 0:
                prompts = data.xstest_prompts(label, d.data_dir, bad_rows=d.bad_rows)
                if count is not None:
                    prompts = data.subsample(prompts, count, seed=cfg.eval.xstest.seed, what=f"eval.xstest.{label}")
                xstest[label] = prompts
    return harmful, xstest


def prepare_instruction_data(cfg: ExperimentConfig) -> PreparedData:
    """Study A: benign instruction datasets (Qi et al.'s safety rows removed, cut to one N), native format."""
    d, f = cfg.data, cfg.data.finetune
    sets = data.instruction_sets(f.datasets, remove_safety_rows=f.remove_safety, equalize=f.equalize, size=f.size,
                                 val_size=f.val_size, seed=f.seed, data_dir=d.data_dir, bad_rows=d.bad_rows)
    harmful, xstest = harmful_and_xstest(cfg)
    cleaned = f.remove_safety and any(name in data.QI_CLEANED for name in f.datasets)
    checksums = dataset_checksums([*f.datasets, *(["qi2024_safety_removed"] if cleaned else []),
                                   *d.harmful.sources], cfg)
    selection = f.model_dump(mode="json", exclude={"datasets", "selfgen"})
    identity = {
        name: {"task": d.task, "dataset": name, "format": "native", **selection,
               "train_sha256": data.rows_checksum(train), "val_sha256": data.rows_checksum(val)}
        for name, (train, val) in sets.items()
    }
    return PreparedData(
        {name: train for name, (train, _) in sets.items()}, {name: val for name, (_, val) in sets.items()}, {},
        harmful, checksums, xstest["safe"], xstest["unsafe"],
        set_tags={name: {"dataset": name, "format": "native"} for name in sets}, set_identity=identity,
    )


class ExperimentRunner:
    """Runs one experiment config; `run()` returns a summary row per evaluated model state."""

    def __init__(self, cfg: ExperimentConfig, *, train: bool = True):
        self.cfg = cfg
        self.train = train
        self.summary: list[SummaryRow] = []
        self.untrained: list[str] = []
        self.selfgen_inputs: dict[str, list] = {}
        """Self-generated training set key -> its JSONL file as an MLflow dataset record."""

    # -- set-up: everything that can fail on bad input happens here, before any MLflow run ---------------
    def prepare(self) -> None:
        cfg = self.cfg
        self.check_schema_version()
        # Kernels, precision and batching (`runtime:`, overridable by environment variables): a bad value fails here.
        runtime.activate(runtime.resolve(cfg.runtime))
        data.DROPPED_ROWS.clear()  # what this study's data left out, not an earlier load's
        self.data = prepare_data(cfg)
        self.model_source = resolve_model(cfg.model)
        self.eval_model, self.tokenizer = load_model(cfg.model, quantize_4bit=cfg.train.quantize_4bit)
        self.cache = GenerationCache(Path(cfg.output_dir) / "cache" / "generations.sqlite") if cfg.eval.cache else None
        # A judge model is loaded (or, for a judge with `engine: vllm`, its vLLM server started, judges/vllm_server.py)
        # now: bad ones fail early.
        judge_models = JudgeModels(cfg.eval.batch_size, self.cache, server_log_dir=Path(cfg.output_dir) / "logs")
        self.judges = [build_judge(settings, judge_models) for settings in cfg.eval.judges]
        # Over-refusal is judged once per refusal family (keyword detection serves every harm judge).
        self.refusal_judges = list({judge.name: judge for judge in map(refusal_judge, self.judges)}.values())
        if cfg.eval.task:
            task_metrics(["warm-up"], ["warm-up"], sbert_model=cfg.eval.sbert_model)  # fails now if S-BERT can't load
        for method in cfg.train.methods:
            training_method(method).check(self)
        self.prepare_toxicity()
        self.tracker = Tracker(cfg.name, cfg.tracking.uri)
        dropped = {name: count for name, count in sorted(data.DROPPED_ROWS.items()) if count}
        self.tracker.run_tags = {**runtime.current().tags(), Tag.BASE_WEIGHTS.key: weights_description(self.eval_model),
                                 Tag.ROWS_DROPPED.key: ",".join(f"{name}:{n}" for name, n in dropped.items()) or "none"}
        if self.tracker.run_tags[Tag.FAST_GENERATION.key] == "on":  # switched on, but this model may not take it
            unsupported = fast_generation_unsupported(self.eval_model)  # e.g. "quantized weights" (QLoRA)
            if unsupported is not None:
                self.tracker.run_tags[Tag.FAST_GENERATION.key] = f"off: {unsupported}"
        self.tracker.set_experiment_tag(ExperimentTag.SCHEMA_VERSION, str(SCHEMA_VERSION))
        self.check_dataset_drift()
        self.tracker.evaluation_inputs = evaluation_datasets(cfg)
        # Which human-label validation each judge's numbers rest on (issue 9): looked up once, tagged on every
        # harmful evaluation; "none" when the judge was never validated in this store.
        self.judge_validation = {
            judge.name: validation_tags(latest_validation(self.tracker, judge.name, judge.version))
            for judge in (*self.judges, *self.refusal_judges)
        }
        # Whose ASR the summary and the figures lead with (issue 21), and why; the figures read it from the study.
        self.headline = headline_judge(self.tracker, [(judge.name, judge.version) for judge in self.judges],
                                       cfg.eval.headline)
        self.tracker.set_experiment_tag(ExperimentTag.HEADLINE_JUDGE, self.headline[0])
        self.tracker.set_experiment_tag(ExperimentTag.HEADLINE_JUDGE_REASON, self.headline[1])
        setup = EvaluationSetup(cfg, self.data, self.judges, self.refusal_judges, self.judge_validation,
                                self.toxicity, self.toxicity_prompts, generation_cache=self.cache)
        self.evaluator = StateEvaluator(self.tracker, setup, self.tokenizer)
        # The figures and the sweep read the evaluations of the prompts this config chooses, not older ones.
        self.tracker.set_experiment_tag(ExperimentTag.CURRENT_SELECTION,
                                        json.dumps(self.evaluator.current_selection(cfg.data.formats), sort_keys=True))

    def prepare_toxicity(self) -> None:
        """The toxicity scorer and the prompts it scores (Study A: the hate-speech subset), checked now."""
        self.toxicity, self.toxicity_prompts = None, []
        settings = self.cfg.eval.toxicity
        if settings is None:
            return
        from harness.evals.toxicity import make_scorer

        wanted = None if settings.categories is None else set(settings.categories)
        self.toxicity_prompts = [i for i, prompt in enumerate(self.data.harmful) if wanted is None or prompt.category in wanted]
        if not self.toxicity_prompts:
            found = sorted({prompt.category for prompt in self.data.harmful})[:12]
            raise HarnessError(f"eval.toxicity.categories {settings.categories} match none of the harmful prompts "
                               f"(their categories include: {', '.join(found)})")
        cache = Path(self.cfg.output_dir) / "cache" / "toxicity.sqlite" if self.cfg.eval.cache else None
        self.toxicity = make_scorer(settings, cache)

    def training_sets(self) -> list[str]:
        """Keys of the sets every (method, seed) is fine-tuned on: formats (Study B) or datasets (Study A)."""
        return list(self.data.set_tags)

    def check_schema_version(self) -> None:
        """A study's unit identities are those of one schema version: a store made by another is refused before
        anything loads, never mixed into (tracking/schema.py)."""
        recorded = Tracker.schema_version(self.cfg.name, self.cfg.tracking.uri)
        if recorded not in (None, str(SCHEMA_VERSION)):
            raise HarnessError(
                f"study '{self.cfg.name}' in {resolve_tracking_uri(self.cfg.tracking.uri)} was made with run schema "
                f"{recorded} and this harness writes schema {SCHEMA_VERSION}; rerun with --new-version to start a "
                "new study version (or give the study a new name)")

    def check_dataset_drift(self) -> None:
        """A study's numbers rest on its data: a file whose checksum changed since the study began is an error."""
        recorded = json.loads(self.tracker.experiment_tag(ExperimentTag.DATASET_CHECKSUMS) or "{}")
        changed = sorted(path for path in recorded.keys() & self.data.checksums.keys()
                         if recorded[path] != self.data.checksums[path])
        if changed:
            path = changed[0]
            raise HarnessError(
                f"dataset file {path} changed since study '{self.cfg.name}' began (sha256 {recorded[path][:12]} -> "
                f"{self.data.checksums[path][:12]}); restore it, or rerun with --new-version to start a new study version"
            )
        merged = {**recorded, **self.data.checksums}  # a file this study had not used before joins the record
        if merged != recorded:
            self.tracker.set_experiment_tag(ExperimentTag.DATASET_CHECKSUMS, json.dumps(merged, sort_keys=True))

    def base_unit(self) -> dict:
        """The resolved config that identifies the base model's evaluation unit. A 4-bit base (QLoRA) generates
        other replies than the bf16 one, so it is another unit; the key is absent otherwise, which keeps the
        base units of existing studies."""
        unit = {"model": self.cfg.model, "model_digest": model_digest(self.model_source), "method": "base", "epoch": 0}
        if self.cfg.train.quantize_4bit:
            unit["quantize_4bit"] = True
        return unit

    def finetune_unit(self, fmt: str, method: str, seed: int) -> dict:
        """`fmt` is a training-set key (a format in Study B, a dataset in Study A); its identity is in the hash."""
        unit = {
            "model": self.cfg.model,
            "model_digest": model_digest(self.model_source),
            "method": method,
            "seed": seed,
            "data": self.data.set_identity[fmt],
            # A method's own settings identify only its units: ProMoT's must not "change" an SFT fine-tune.
            "train": training_method(method).train_identity(self.cfg.train),
        }
        # Which other methods the study runs says nothing about this fine-tune: adding ProMoT to a finished SFT
        # study trains only ProMoT.
        unit["train"].pop("methods")
        # QLoRA's adapters train in float32 (sft.keep_adapter_in_float32), not in the bfloat16 TRL gave the first H200
        # QLoRA runs: those are other fine-tunes.
        if self.cfg.train.quantize_4bit:
            unit["adapter_dtype"] = "float32"
        return unit

    # -- the study ----------------------------------------------------------------------------------------
    def run(self) -> list[SummaryRow]:
        self.prepare()
        cfg = self.cfg
        if cfg.eval.evaluate_base:
            self.evaluate_base()
            self.report_progress()
        if cfg.data.task == "instructions" and cfg.data.finetune.selfgen.enabled:
            self.add_self_generated_sets()
        for method in cfg.train.methods:
            for fmt in self.training_sets():
                for seed in cfg.seeds:
                    self.finetune(method, fmt, seed)
                    self.report_progress()
        return self.summary

    def report_progress(self) -> None:
        """The one-line view of the whole study (`units 12/40 done, ~35 min left`) above the per-step bars."""
        from harness.study.status import report_progress

        report_progress(self.cfg, data=self.data, source=self.model_source)

    def add_self_generated_sets(self) -> None:
        """Study A: for every dataset, the base model's own answers to its instructions become `<name>-selfgen`."""
        from harness.data.selfgen import self_generate

        for name in self.cfg.data.finetune.selfgen.datasets or list(self.data.set_tags):
            version = self_generate(self, name)
            key = f"{name}-selfgen"
            self.data.train[key], self.data.val[key] = version.train, version.val
            self.data.set_tags[key] = {"dataset": key, "format": "native", "responses": "self-generated",
                                       "dataset_version": version.sha256[:16]}
            self.data.set_identity[key] = {**self.data.set_identity[name], "dataset": key, "responses": "self-generated",
                                           "train_sha256": version.sha256, "val_sha256": data.rows_checksum(version.val)}
            self.data.checksums[f"selfgen/{key}.jsonl"] = version.file_sha256
            self.selfgen_inputs[key] = [file_record(key, version.path, version.file_sha256)]

    def training_datasets(self, key: str) -> list:
        """The datasets a fine-tune on training set `key` reads: its MLflow dataset inputs (context training)."""
        d = self.cfg.data
        if key in self.selfgen_inputs:
            return self.selfgen_inputs[key]
        if d.task != "instructions":  # Study B: every format is rendered from the one procedure set
            return registry_records([d.procedures], d.data_dir)
        cleaned = ["qi2024_safety_removed"] if d.finetune.remove_safety and key in data.QI_CLEANED else []
        return registry_records([key, *cleaned], d.data_dir)

    def finetune(self, method: str, fmt: str, seed: int, parent: RunHandle | None = None) -> None:
        """One fine-tune unit; `parent` nests it (a sweep's trial run). A FINISHED one anywhere in the study is reused."""
        cfg = self.cfg
        unit = self.finetune_unit(fmt, method, seed)
        unit_hash = config_hash(unit)
        tags = {"model": cfg.model, **self.data.set_tags[fmt], "method": method, "seed": seed}
        output_dir = Path(cfg.output_dir) / cfg.name / f"{method}-{fmt}-seed{seed}-{unit_hash}"
        done = self.tracker.finished("finetune", unit_hash)
        if done is not None and parent is None and self.made_by_trial(done):
            # `harness run` reuses a sweep trial's fine-tune: the same unit is an arm of the study too (figures.py)
            self.tracker.client.set_tag(done.info.run_id, "harness.study_arm", "True")
        if done is not None:  # trained by an earlier invocation: evaluate only what it lacks, train nothing
            self.evaluate_finished_finetune(done, unit, tags)
            return
        if not self.train:  # `harness evaluate`: what no earlier run trained stays untrained
            self.untrained.append(f"{method}-{fmt}-seed{seed}")
            return
        recipe = training_method(method)
        with self.tracker.run("finetune", f"{method}-{fmt}-seed{seed}", tags, parent=parent, config=unit,
                              config_hash=unit_hash, restart=recipe.restart(output_dir)) as run:
            run.log_dict({"datasets": self.data.checksums}, "datasets.json")
            run.log_datasets(self.training_datasets(fmt), TRAINING)
            # Which training path ran (harness/training/fast_training.py): packing changes kernels, not the examples or losses.
            slow_reason = fast_training_unavailable() if recipe.uses_fast_training else f"not used by {method}"
            run.set_tags({Tag.OUTPUT_DIR.key: output_dir.resolve(),
                          Tag.FAST_TRAINING.key: "on" if slow_reason is None else f"off: {slow_reason}"})
            train_model, train_tokenizer = load_model(cfg.model, quantize_4bit=cfg.train.quantize_4bit)
            recipe.train(self, run, unit, tags, output_dir, train_model, train_tokenizer)

    def made_by_trial(self, run) -> bool:
        parent_id = run.data.tags.get("mlflow.parentRunId")
        return bool(parent_id) and self.tracker.client.get_run(parent_id).data.tags.get(Tag.KIND.key) == Kind.TRIAL

    def evaluate_checkpoints(self, parent: RunHandle, unit: dict, tags: dict, checkpoints, *, prompt=None) -> None:
        """One `checkpoint` run per saved epoch, evaluated (with `prompt`: also with ProMoT's prompt attached)."""
        method, seed = tags["method"], tags["seed"]
        key = training_set_key(tags)
        for checkpoint in checkpoints:
            ckpt_unit = {**unit, "epoch": checkpoint.epoch}
            ckpt_tags = {**tags, "epoch": checkpoint.epoch}
            done = self.tracker.finished("checkpoint", config_hash(ckpt_unit), parent)
            if done is not None:  # an earlier invocation's: evaluate only what it lacks
                self.evaluate_checkpoint(done.info.run_id, ckpt_unit, ckpt_tags, checkpoint.path, lambda: prompt)
                continue
            with self.tracker.run("checkpoint", f"{method}-{key}-seed{seed}-epoch{checkpoint.epoch}", ckpt_tags,
                                  parent=parent, config=ckpt_unit, config_hash=config_hash(ckpt_unit)) as ckpt_run:
                ckpt_run.set_tags({"harness.adapter_path": checkpoint.path.resolve(), "harness.step": checkpoint.step,
                                   "harness.adapter_merged": merge_for_evaluation(self.eval_model)})
                self.evaluate_checkpoint(ckpt_run.run_id, ckpt_unit, ckpt_tags, checkpoint.path, lambda: prompt)
            faults.reached("checkpoint")  # a test's SIGKILL here falls between two finished checkpoints

    def evaluate_finished_finetune(self, done, unit: dict, tags: dict) -> None:
        """A fine-tune trained by an earlier invocation: each of its checkpoints gets what it lacks (a new judge,
        decoding or prompt selection), from stored responses where they exist, from its adapter otherwise."""
        prompt = training_method(tags["method"]).evaluation_prompt(self, RunHandle(self.tracker.client, done.info.run_id),
                                                                   tags)
        for checkpoint in descendants(self.tracker, done, "checkpoint"):
            epoch = int(checkpoint.data.tags.get("harness.epoch", 0))
            adapter = Path(checkpoint.data.tags.get("harness.adapter_path", ""))
            self.evaluate_checkpoint(checkpoint.info.run_id, {**unit, "epoch": epoch}, {**tags, "epoch": epoch},
                                     adapter, prompt)

    def evaluate_checkpoint(self, run_id: str, ckpt_unit: dict, ckpt_tags: dict, adapter_path: Path,
                            soft_prompt) -> None:
        """The checkpoint's model state, and with ProMoT's prompt attached when the config asks; the adapter is
        loaded only if something must be generated. `soft_prompt()` gives the prompt (or None)."""
        method, seed, epoch = ckpt_tags["method"], ckpt_tags["seed"], ckpt_tags["epoch"]
        key = training_set_key(ckpt_tags)

        def adapter_state() -> str:
            if not (adapter_path / "adapter_config.json").is_file():
                raise HarnessError(f"checkpoint run {run_id} needs new generations but its adapter {adapter_path} is "
                                   "gone; restore it, or start a new study version with --new-version")
            return f"{self.base_state()}+adapter:{file_digest(*sorted(adapter_path.glob('adapter_model.*')))}"

        @contextmanager
        def adapter():
            state = adapter_state()  # the adapter is there, before anything loads
            merged = merge_for_evaluation(self.eval_model)
            model = load_adapter(self.eval_model, adapter_path, merged_copy=merged)
            try:
                yield model, state + (":merged" if merged else "")
            finally:
                if not merged:  # an in-place adapter comes out again; a merged copy is simply dropped
                    self.eval_model = unload_adapter(model)
                del model
                gc.collect()

        @contextmanager
        def with_prompt():
            prompt = soft_prompt()
            with adapter() as (model, state):
                yield (promot.SoftPromptedLM(model, prompt.embeddings, trainable=False),
                       f"{state}+prompt:{promot.tensor_digest(prompt.embeddings)}")

        self.evaluate(run_id, ckpt_unit, ckpt_tags, (method, key, seed, epoch), [key], adapter)
        if soft_prompt() is not None:
            self.evaluate(run_id, {**ckpt_unit, "soft_prompt": True}, {**ckpt_tags, "soft_prompt": True},
                          (f"{method}+prompt", key, seed, epoch), [key], with_prompt)

    def evaluate_base(self, parent: RunHandle | None = None) -> str:
        """The base model's `checkpoint` run (epoch 0), evaluated on what it lacks; returns its run id."""
        cfg = self.cfg
        unit = self.base_unit()
        tags = {"model": cfg.model, "method": "base", "epoch": 0}
        done = self.tracker.finished("checkpoint", config_hash(unit))

        @contextmanager
        def base_model():
            yield self.eval_model, self.base_state()

        if done is not None:
            self.evaluate(done.info.run_id, unit, tags, ("base", "-", None, 0), cfg.data.formats, base_model)
            return done.info.run_id
        with self.tracker.run("checkpoint", "base", tags, parent=parent, config=unit, config_hash=config_hash(unit)) as run:
            run.log_dict({"datasets": self.data.checksums}, "datasets.json")
            self.evaluate(run.run_id, unit, tags, ("base", "-", None, 0), cfg.data.formats, base_model)
        return run.run_id

    def base_state(self) -> str:
        """Identifies the base weights in generation-cache keys (4-bit loading changes the outputs)."""
        return f"{model_digest(self.model_source)}:4bit={self.cfg.train.quantize_4bit}"

    def evaluate(self, run_id: str, unit: dict, tags: dict, label: tuple, score_formats: list[str], open_model) -> None:
        """Evaluate one model state under checkpoint run `run_id` (harness/evals/state.py); note its summary row."""
        headline = self.evaluator.evaluate(run_id, unit, tags, state_id=config_hash(unit), score_formats=score_formats,
                                           open_model=open_model)
        self.summary.append(SummaryRow(*label, metrics=headline))


def children(tracker: Tracker, run) -> list:
    return tracker.search(f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


def descendants(tracker: Tracker, run, kind: str) -> list:
    """FINISHED runs of `kind` below `run` (checkpoints hang under a finetune, or under ProMoT's stage 2)."""
    found, frontier = [], [run]
    while frontier:
        for child in children(tracker, frontier.pop()):
            if child.data.tags.get("harness.kind") == kind and child.info.status == "FINISHED":
                found.append(child)
            elif child.data.tags.get("harness.kind") == "stage":
                frontier.append(child)
    return sorted(found, key=lambda child: int(child.data.tags.get("harness.epoch", 0)))


@dataclass
class StudyResult:
    summary: list[SummaryRow]
    ui: str
    """The command that opens the MLflow UI on the study's store."""
    unfinished: int
    """Runs of the study that are not FINISHED (other configs' interrupted attempts; never reported)."""
    counts: dict[str, int]
    """What this invocation made and what it reused: generations, evaluations, prompts generated."""
    untrained: list[str]
    """Fine-tunes `harness evaluate` left out because no earlier run trained them."""
    headline: tuple[str, str] | None = None
    """(judge, reason): whose ASR the summary's ASR column shows (`judges.validation.headline_judge`)."""


def run_experiment(cfg: ExperimentConfig, *, new_version: bool = False, train: bool = True) -> StudyResult:
    """Run a whole study: rerunning it trains nothing that is FINISHED and evaluates only what the store lacks
    (a new judge, decoding or prompt selection; issue 20), and resumes what was interrupted (issue 8).
    `train=False` (`harness evaluate`) evaluates what is trained and trains nothing. `new_version` starts the
    study afresh as `NAME-vN` instead (for when its data changed on purpose).
    """
    if new_version:
        cfg = cfg.model_copy(update={"name": Tracker.next_version(cfg.name, cfg.tracking.uri)})
    runner = ExperimentRunner(cfg, train=train)
    try:
        summary = runner.run()
    finally:
        runtime.activate(None)  # the study's runtime settings end with it
    unfinished = sum(run.info.status != "FINISHED" for run in runner.tracker.search())
    return StudyResult(summary, ui_command(runner.tracker.tracking_uri), unfinished, dict(runner.evaluator.counts),
                       runner.untrained, runner.headline)
