"""The experiment pipeline: config → data → base evaluation → fine-tunes → per-epoch evaluation → MLflow.

Everything that can fail on bad input (config, datasets, models, judges, the S-BERT model) is prepared
*before* the first MLflow run is created, so a typo never leaves half-made runs behind.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from harness import data, formats, promot
from harness.config import DecodingConfig, ExperimentConfig, JudgeConfig, config_hash
from harness.evaluation import generate, judge_safety, score_task
from harness.judge_validation import latest_validation, validation_tags
from harness.judges import Judge, KeywordJudge, LLMJudge
from harness.generation import generate_responses
from harness.metrics import task_metrics
from harness.models import load_adapter, load_model, model_digest, resolve_model, unload_adapter
from harness.sft import train_sft, user_message
from tracking import RunHandle, Tracker
from tracking.store import ui_command

TASK_BENCHMARK = "wikihow"
HARMFUL_BENCHMARK = "harmful_mix"


@dataclass
class PreparedData:
    """Everything the study reads, loaded and checked up front."""

    train: dict[str, list[data.FinetuneRow]]
    val: dict[str, list[data.FinetuneRow]]
    test: dict[str, list[data.FinetuneRow]]
    harmful: list[data.HarmfulPrompt]
    checksums: dict[str, str]


@dataclass
class SummaryRow:
    method: str
    format: str
    seed: int | None
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    d = cfg.data
    procedures = data.load_procedures(d.data_dir)
    train, val, test = data.split(procedures, (d.train_size, d.val_size, d.test_size), seed=d.split_seed)
    rows = {
        part_name: {fmt: formats.build_task_rows(part, fmt) for fmt in d.formats}
        for part_name, part in (("train", train), ("val", val), ("test", test))
    }
    harmful = data.harmful_mix(d.harmful.sources, seed=d.harmful.seed, data_dir=d.data_dir)
    checksums: dict[str, str] = {}
    for name in (d.task, *d.harmful.sources):
        checksums.update(data.checksums(name, d.data_dir))
    return PreparedData(rows["train"], rows["val"], rows["test"], harmful, checksums)


def build_judge(judge_cfg: JudgeConfig, batch_size: int) -> Judge:
    """A judge ready to score; an LLM judge's model is loaded now so a bad one fails before any run."""
    if judge_cfg.name == "keyword":
        return KeywordJudge()
    model, tokenizer = load_model(judge_cfg.model, quantize_4bit=judge_cfg.quantize_4bit)

    def complete(conversations: list[list[dict]]) -> list[str]:
        return generate_responses(
            model, tokenizer, conversations, temperature=0.0, max_new_tokens=judge_cfg.max_new_tokens,
            batch_size=batch_size, desc="judging",
        )

    return LLMJudge(complete, template_path=judge_cfg.template, threshold=judge_cfg.threshold, model_name=judge_cfg.model)


class ExperimentRunner:
    """Runs one experiment config; `run()` returns a summary row per evaluated model state."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.summary: list[SummaryRow] = []

    # -- set-up: everything that can fail on bad input happens here, before any MLflow run ---------------
    def prepare(self) -> None:
        cfg = self.cfg
        self.data = prepare_data(cfg)
        self.model_source = resolve_model(cfg.model)
        self.eval_model, self.tokenizer = load_model(cfg.model, quantize_4bit=cfg.train.quantize_4bit)
        self.judges = [build_judge(judge_cfg, cfg.eval.batch_size) for judge_cfg in cfg.eval.judges]
        if cfg.eval.task:
            task_metrics(["warm-up"], ["warm-up"], sbert_model=cfg.eval.sbert_model)  # fails now if S-BERT can't load
        if "promot" in cfg.train.methods:
            self.check_promot()
        self.tracker = Tracker(cfg.name, cfg.tracking.uri)
        # Which human-label validation each judge's numbers rest on (issue 9): looked up once, tagged on every
        # harmful evaluation; "none" when the judge was never validated in this store.
        self.judge_validation = {
            judge.name: validation_tags(latest_validation(self.tracker, judge.name, judge.version)) for judge in self.judges
        }

    def check_promot(self) -> None:
        """ProMoT's inputs that only a loaded model can check: the prompt fits, a reused prompt matches."""
        settings = self.cfg.train.promot
        promot.check_prompt_length(self.eval_model, settings.prompt_length, self.cfg.train.max_length)
        if settings.prompt_path is not None:
            prompt = promot.SoftPrompt.load(settings.prompt_path, expect_model_digest=model_digest(self.model_source))
            hidden = self.eval_model.get_input_embeddings().weight.shape[1]
            if prompt.embeddings.shape[1] != hidden:
                raise promot.PromotError(
                    f"stage-1 prompt {settings.prompt_path} has width {prompt.embeddings.shape[1]}, the model {hidden}"
                )

    def base_unit(self) -> dict:
        """The resolved config that identifies the base model's evaluation unit."""
        return {"model": self.cfg.model, "model_digest": model_digest(self.model_source), "method": "base", "epoch": 0}

    def finetune_unit(self, fmt: str, method: str, seed: int) -> dict:
        d = self.cfg.data
        return {
            "model": self.cfg.model,
            "model_digest": model_digest(self.model_source),
            "method": method,
            "seed": seed,
            "data": {
                "task": d.task, "format": fmt, "train_size": d.train_size, "val_size": d.val_size,
                "test_size": d.test_size, "split_seed": d.split_seed,
                "checksums": {path: digest for path, digest in self.data.checksums.items() if "wikihow" in path},
            },
            # ProMoT's settings identify only ProMoT units: changing them must not "change" an SFT fine-tune.
            "train": self.cfg.train.model_dump(mode="json", exclude=None if method == "promot" else {"promot"}),
        }

    # -- the study ----------------------------------------------------------------------------------------
    def run(self) -> list[SummaryRow]:
        self.prepare()
        cfg = self.cfg
        if cfg.eval.evaluate_base:
            unit = self.base_unit()
            tags = {"model": cfg.model, "method": "base", "epoch": 0}
            with self.tracker.run("checkpoint", "base", tags, config=unit, config_hash=config_hash(unit)) as run:
                run.log_dict({"datasets": self.data.checksums}, "datasets.json")
                self.evaluate_state(run, unit, tags, score_formats=cfg.data.formats, label=("base", "-", None, 0))
        for method in cfg.train.methods:
            for fmt in cfg.data.formats:
                for seed in cfg.seeds:
                    self.finetune(method, fmt, seed)
        return self.summary

    def finetune(self, method: str, fmt: str, seed: int) -> None:
        cfg = self.cfg
        unit = self.finetune_unit(fmt, method, seed)
        unit_hash = config_hash(unit)
        tags = {"model": cfg.model, "dataset": cfg.data.task, "format": fmt, "method": method, "seed": seed}
        output_dir = Path(cfg.output_dir) / cfg.name / f"{method}-{fmt}-seed{seed}-{unit_hash}"
        with self.tracker.run("finetune", f"{method}-{fmt}-seed{seed}", tags, config=unit, config_hash=unit_hash) as run:
            run.log_dict({"datasets": self.data.checksums}, "datasets.json")
            run.set_tags({"harness.output_dir": output_dir.resolve()})
            train_model, train_tokenizer = load_model(cfg.model, quantize_4bit=cfg.train.quantize_4bit)
            if method == "sft":
                checkpoints = train_sft(
                    train_model, train_tokenizer, self.data.train[fmt], self.data.val[fmt], cfg.train,
                    seed=seed, output_dir=output_dir, run=run,
                )
                del train_model
                gc.collect()
                self.evaluate_checkpoints(run, unit, tags, checkpoints)
            else:
                self.finetune_promot(run, unit, tags, train_model, train_tokenizer, output_dir)

    def finetune_promot(self, run: RunHandle, unit: dict, tags: dict, model, tokenizer, output_dir: Path) -> None:
        """ProMoT's two stages as nested `stage` runs; checkpoints hang under stage 2, evaluated without the prompt."""
        cfg = self.cfg
        fmt, seed = tags["format"], tags["seed"]
        name = f"promot-{fmt}-seed{seed}"
        stage1_unit = {**unit, "stage": 1}
        with self.tracker.run("stage", f"{name}-stage1", {**tags, "stage": 1}, parent=run,
                              config=stage1_unit, config_hash=config_hash(stage1_unit)) as stage1_run:
            if cfg.train.promot.prompt_path is not None:
                prompt = promot.SoftPrompt.load(cfg.train.promot.prompt_path, expect_model_digest=unit["model_digest"])
                stage1_run.set_tags({"harness.prompt_source": cfg.train.promot.prompt_path.resolve()})
                prompt.save(output_dir / "stage1")
            else:
                prompt = promot.train_stage1(
                    model, tokenizer, self.data.train[fmt], cfg.train.promot, cfg.train, seed=seed,
                    output_dir=output_dir / "stage1", run=stage1_run,
                    meta={"model": cfg.model, "model_digest": unit["model_digest"], "format": fmt},
                )
            stage1_run.log_artifacts(str(output_dir / "stage1"), "soft_prompt")
            stage1_run.set_tags({"harness.prompt_sha256": prompt.meta.get("sha256") or promot.tensor_digest(prompt.embeddings)})
        stage2_unit = {**unit, "stage": 2}
        with self.tracker.run("stage", f"{name}-stage2", {**tags, "stage": 2}, parent=run,
                              config=stage2_unit, config_hash=config_hash(stage2_unit)) as stage2_run:
            checkpoints = promot.train_stage2(
                model, tokenizer, self.data.train[fmt], self.data.val[fmt], prompt, cfg.train, seed=seed,
                output_dir=output_dir / "stage2", run=stage2_run,
            )
            del model
            gc.collect()
            self.evaluate_checkpoints(stage2_run, unit, tags, checkpoints,
                                      prompt=prompt if cfg.train.promot.evaluate_with_prompt else None)

    def evaluate_checkpoints(self, parent: RunHandle, unit: dict, tags: dict, checkpoints, *, prompt=None) -> None:
        """One `checkpoint` run per saved epoch; with `prompt`, a second set of evaluations with it attached."""
        method, fmt, seed = tags["method"], tags["format"], tags["seed"]
        for checkpoint in checkpoints:
            ckpt_unit = {**unit, "epoch": checkpoint.epoch}
            ckpt_tags = {**tags, "epoch": checkpoint.epoch}
            name = f"{method}-{fmt}-seed{seed}-epoch{checkpoint.epoch}"
            with self.tracker.run("checkpoint", name, ckpt_tags, parent=parent, config=ckpt_unit,
                                  config_hash=config_hash(ckpt_unit)) as ckpt_run:
                ckpt_run.set_tags({"harness.adapter_path": checkpoint.path.resolve(), "harness.step": checkpoint.step})
                self.eval_model = load_adapter(self.eval_model, checkpoint.path)
                try:
                    self.evaluate_state(ckpt_run, ckpt_unit, ckpt_tags, score_formats=[fmt],
                                        label=(method, fmt, seed, checkpoint.epoch))
                    if prompt is not None:
                        with_prompt = promot.SoftPromptedLM(self.eval_model, prompt.embeddings, trainable=False)
                        self.evaluate_state(ckpt_run, {**ckpt_unit, "soft_prompt": True},
                                            {**ckpt_tags, "soft_prompt": True}, score_formats=[fmt],
                                            label=(f"{method}+prompt", fmt, seed, checkpoint.epoch), model=with_prompt)
                finally:
                    self.eval_model = unload_adapter(self.eval_model)

    def evaluate_state(self, parent: RunHandle, unit: dict, tags: dict, *, score_formats: list[str], label: tuple,
                       model=None) -> None:
        """Every decoding setting × repeat: harmful prompts (scored by each judge) and the task test split."""
        cfg = self.cfg
        model = model if model is not None else self.eval_model
        summary = SummaryRow(*label)
        for decoding in cfg.eval.decoding:
            for repeat in range(decoding.repeats):
                seed = cfg.eval.seed + repeat
                decoding_tags = {"temperature": decoding.temperature, "min_p": decoding.min_p, "repeat": repeat}
                suffix = f"T{decoding.temperature:g}" + (f"-r{repeat}" if decoding.repeats > 1 else "")
                suffix += "-with-prompt" if tags.get("soft_prompt") else ""
                self.evaluate_safety(model, parent, unit, {**tags, **decoding_tags}, decoding, seed, suffix, summary)
                if cfg.eval.task:
                    self.evaluate_task(model, parent, unit, {**tags, **decoding_tags}, decoding, seed, suffix, score_formats, summary)
        self.summary.append(summary)

    def evaluate_safety(self, model, parent, unit, tags, decoding: DecodingConfig, seed: int, suffix: str, summary: SummaryRow) -> None:
        cfg = self.cfg
        prompts = self.data.harmful
        responses = generate(
            model, self.tokenizer, [prompt.prompt for prompt in prompts], decoding,
            batch_size=cfg.eval.batch_size, seed=seed, desc=f"harmful prompts ({suffix})",
        )
        for judge in self.judges:
            eval_unit = {
                **unit, "benchmark": HARMFUL_BENCHMARK, "harmful": cfg.data.harmful.model_dump(mode="json"),
                "decoding": decoding.model_dump(mode="json"), "repeat": tags["repeat"], "seed_eval": seed,
                "judge": f"{judge.name}:{judge.version}",
            }
            eval_tags = {**tags, "benchmark": HARMFUL_BENCHMARK, "judge": f"{judge.name}:{judge.version}",
                         **self.judge_validation[judge.name]}
            with self.tracker.run("evaluation", f"{HARMFUL_BENCHMARK}-{judge.name}-{suffix}", eval_tags, parent=parent,
                                  config=eval_unit, config_hash=config_hash(eval_unit)) as run:
                result = judge_safety(prompts, responses, judge, seed=seed)
                run.log_metrics(result.metrics)
                run.log_table(result.table, "per_prompt.json")
            if tags["repeat"] == 0:
                summary.metrics[f"asr_{judge.name}"] = result.metrics["asr"]

    def evaluate_task(self, model, parent, unit, tags, decoding, seed, suffix, score_formats, summary: SummaryRow) -> None:
        cfg = self.cfg
        # The instruction is the same in every format, so one generation serves every format's references.
        rows_any_format = self.data.test[score_formats[0]]
        responses = generate(
            model, self.tokenizer, [user_message(row) for row in rows_any_format], decoding,
            batch_size=cfg.eval.batch_size, seed=seed, desc=f"task test split ({suffix})",
        )
        for fmt in score_formats:
            eval_unit = {**unit, "benchmark": TASK_BENCHMARK, "format": fmt, "decoding": decoding.model_dump(mode="json"),
                         "repeat": tags["repeat"], "seed_eval": seed, "sbert_model": cfg.eval.sbert_model}
            eval_tags = {**tags, "benchmark": TASK_BENCHMARK, "format": fmt}
            with self.tracker.run("evaluation", f"{TASK_BENCHMARK}-{fmt}-{suffix}", eval_tags, parent=parent,
                                  config=eval_unit, config_hash=config_hash(eval_unit)) as run:
                result = score_task(self.data.test[fmt], responses, fmt, sbert_model=cfg.eval.sbert_model, seed=seed)
                run.log_metrics(result.metrics)
                run.log_table(result.table, "per_prompt.json")
            if tags["repeat"] == 0 and (len(score_formats) == 1 or fmt == "prose"):
                summary.metrics.update({"rouge_l": result.metrics["rouge_l"], "sbert": result.metrics["sbert"],
                                        "format_adherence": result.metrics["format_adherence"]})


def run_experiment(cfg: ExperimentConfig) -> tuple[list[SummaryRow], str]:
    """Run a whole study; returns its summary and the command that opens the MLflow UI on its store."""
    runner = ExperimentRunner(cfg)
    summary = runner.run()
    return summary, ui_command(runner.tracker.tracking_uri)
