"""The study's run schema in one place: run kinds, `harness.*` tag names, benchmark and metric names, and
the schema version. Every module that writes or reads runs (the runner, the sweep, the figures, the
consistency report, the tests) takes its names from here, so a renamed tag cannot leave a reader behind.
CONVENTIONS.md describes the same schema in prose.

No torch, no MLflow import: the figures and the CLI's `check` import this without loading a model stack.

Tag names are the *short* names (`Tag.KIND == "kind"`): `Tracker.run` adds the `harness.` prefix to the tags
it is given, and `Tag.KIND.key` is the full MLflow tag name a reader looks up (`"harness.kind"`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum

PREFIX = "harness."

SCHEMA_VERSION = 2
"""Bumped whenever a unit's identity (its config hash) or the run tree changes meaning. A study records the
version it was made with (`ExperimentTag.SCHEMA_VERSION`); a store of another version is refused, never
mixed: 1 = before stored generations (issue 20), 2 = generation records + judgements keyed by their inputs (an
engine other than HF `generate`, `eval.engine` of issue 22, joins a generation's identity without a new version:
HF records keep theirs)."""


class Kind(StrEnum):
    """`harness.kind`: what a run is. The tree is sweep → trial → finetune → [stage →] checkpoint →
    generation / evaluation; dataset, judge_validation, judge_training and report runs stand alone."""

    SWEEP = "sweep"
    TRIAL = "trial"
    FINETUNE = "finetune"
    STAGE = "stage"
    CHECKPOINT = "checkpoint"
    GENERATION = "generation"
    EVALUATION = "evaluation"
    JUDGE_VALIDATION = "judge_validation"
    JUDGE_TRAINING = "judge_training"
    """`harness judges train`: a judge fine-tuned on the human-labelled sets' calibration splits."""
    DATASET = "dataset"
    REPORT = "report"


PARENT_KINDS = (Kind.SWEEP, Kind.TRIAL, Kind.FINETUNE, Kind.STAGE, Kind.CHECKPOINT)
"""Kinds whose runs have children: an unfinished one is reattached on rerun, not replaced (tracking/runs.py)."""


class Tag(StrEnum):
    """Every `harness.*` run tag, by its short name; `.key` is the full MLflow tag name."""

    # every run
    KIND = "kind"
    STUDY = "study"
    CONFIG_HASH = "config_hash"
    GIT_COMMIT = "git_commit"
    VERSION = "version"
    OWNER = "owner"
    ATTEMPT = "attempt"
    ERROR = "error"
    CLI = "cli"
    # what was trained
    MODEL = "model"
    METHOD = "method"
    DATASET = "dataset"
    FORMAT = "format"
    SEED = "seed"
    EPOCH = "epoch"
    STAGE = "stage"
    STEP = "step"
    RESPONSES = "responses"
    DATASET_VERSION = "dataset_version"
    OUTPUT_DIR = "output_dir"
    OPTIMIZER = "optimizer"
    FAST_TRAINING = "fast_training"
    """`on`, or `off: <why>` (switched off, not on CUDA, not used by promot): which SFT training path ran."""
    PROMOT_PRECISION = "promot_precision"
    PROMOT_ATTENTION = "promot_attention"
    PROMOT_MICRO_BATCH = "promot_micro_batch"
    BASE_WEIGHTS = "base_weights"
    """What the base model's weights were in this invocation (`harness.models.weights_description`): `bfloat16`,
    `float32`, or `nf4 (bitsandbytes …)` when `train.quantize_4bit` loaded them 4-bit (QLoRA); on every run."""
    ADAPTER_PATH = "adapter_path"
    ADAPTER_MERGED = "adapter_merged"
    ADAPTER_DTYPE = "adapter_dtype"
    """The dtype the LoRA weights trained in (`float32`; TRL alone would give a 4-bit base bfloat16 adapters, whose
    small updates round away: harness/training/sft.py, keep_adapter_in_float32). SFT fine-tune and ProMoT stage-2 runs."""
    PROMPT_DIR = "prompt_dir"
    PROMPT_SHA256 = "prompt_sha256"
    PROMPT_SOURCE = "prompt_source"
    PROMPT_SOURCE_RUN = "prompt_source_run"
    STUDY_ARM = "study_arm"
    # what was evaluated and how
    BENCHMARK = "benchmark"
    JUDGE = "judge"
    SOFT_PROMPT = "soft_prompt"
    TEMPERATURE = "temperature"
    MIN_P = "min_p"
    REPEAT = "repeat"
    SELECTION = "selection"
    GENERATION_RUN = "generation_run"
    GENERATION_HASH = "generation_hash"
    ENGINE = "engine"
    """`hf` or `vllm`: what generated a generation run's responses (and so an evaluation's); `vllm` is also part
    of their identity, so the two engines' responses are never mixed."""
    FAST_GENERATION = "fast_generation"
    """`on` (generation takes harness/generation/fast.py's path for the models it supports), or `off: <why>`."""
    # how a run computed (harness/runtime.py): every run
    RUNTIME = "runtime"
    """JSON of the resolved `runtime:` settings (config, then environment overrides) the run computed with."""
    RUNTIME_OVERRIDES = "runtime_overrides"
    """Comma-separated environment variables that overrode the config's `runtime:` section, or `none`."""
    TOXICITY_SCORER = "toxicity_scorer"
    TOXICITY_CATEGORIES = "toxicity_categories"
    # which judge validation an evaluation relied on (harness/judges/validation.py: validation_tags)
    JUDGE_VALIDATION = "judge_validation"
    """The `judge_validation` run's id, or `none` when the judge was never validated."""
    JUDGE_VALIDATION_SETS = "judge_validation_sets"
    JUDGE_VALIDATION_LIMIT = "judge_validation_limit"
    JUDGE_VALIDATION_SCOPE = "judge_validation_scope"
    """`pooled_harm` or `pooled_refusal`: which pooled agreement `judge_kappa` is."""
    JUDGE_KAPPA = "judge_kappa"
    JUDGE_KAPPA_CI = "judge_kappa_ci"
    VALIDATION_KAPPA = "judge_kappa"  # alias of JUDGE_KAPPA: no run carries a tag `validation_kappa`
    ROWS_DROPPED = "rows_dropped"
    """`dataset:count,...` of records `data.bad_rows: drop` left out of the study's data, or `none`."""
    # datasets (kind dataset)
    DATASET_PATH = "dataset_path"
    DATASET_SHA256 = "dataset_sha256"
    FILE_SHA256 = "file_sha256"
    SOURCE_DATASET = "source_dataset"
    """The human-written dataset a self-generated one (`<name>-selfgen`) took its instructions from."""
    # sweeps (kinds sweep and trial)
    OPTUNA_STORAGE = "optuna_storage"
    OPTUNA_STUDY = "optuna_study"
    OPTUNA_TRIAL_ID = "optuna_trial_id"
    OPTUNA_VERSION = "optuna_version"
    SAMPLER = "sampler"
    SAMPLER_SEED = "sampler_seed"
    N_TRIALS = "n_trials"
    TRIAL_NUMBER = "trial_number"
    """The Optuna trial number (`trial` runs); OPTUNA_TRIAL_ID is the storage's own id."""
    TRIAL_STATE = "trial_state"
    WORKER = "worker"
    RETRY_OF = "retry_of"
    FINETUNE_RUNS = "finetune_runs"
    # reports (kind report)
    REPORT = "report"
    """Which report a `report` run holds: `consistency` (`harness report consistency`) or `figures` (`harness
    figures`: the PNGs, CSVs, report.md and report.html it wrote, as the run's artifacts)."""

    @property
    def key(self) -> str:
        """The full MLflow tag name, e.g. `harness.kind`."""
        return PREFIX + self.value


class ExperimentTag(StrEnum):
    """Tags on a study's MLflow experiment (not on its runs)."""

    EXPERIMENT_KIND = "mlflow.experimentKind"
    """MLflow's own record of what the experiment is; `Tracker` sets it to `EXPERIMENT_KIND` when it is absent."""
    SCHEMA_VERSION = "harness.schema_version"
    DATASET_CHECKSUMS = "harness.dataset_checksums"
    """JSON {file: sha256} of the data the study began with; a changed file is refused."""
    CURRENT_SELECTION = "harness.current_selection"
    """JSON {benchmark: selection hash} of the latest `harness run`: the figures draw these units only."""
    HEADLINE_JUDGE = "harness.headline_judge"
    """The judge (its name, e.g. `keyword`) whose ASR the latest `harness run` led with; the figures lead with it."""
    HEADLINE_JUDGE_REASON = "harness.headline_judge_reason"
    """Why that judge: `eval.headline`, its pooled harm kappa and validation run, or first judge with none validated."""


EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's "Machine learning" experiment kind (its UI's `ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`), read by the
MLflow UIs that choose an experiment's view by its kind: they open a study on its training runs. MLflow 3.17's UI
takes the view from its sidebar's GenAI / Model training switch instead (`tracking.store.ui_command` says so)."""


# Built-in benchmarks (each is also a registry entry in the evaluation stage).
HARMFUL_MIX = "harmful_mix"
XSTEST_UNSAFE = "xstest_unsafe"
XSTEST_SAFE = "xstest_safe"
WIKIHOW = "wikihow"


class Metric(StrEnum):
    """Metric names the evaluations log and the figures, sweep and summary read."""

    ASR = "asr"
    ASR_CI_LOW = "asr_ci_low"
    ASR_CI_HIGH = "asr_ci_high"
    FULFILMENT_RATE = "fulfilment_rate"
    """Study A's name for ASR under the fulfilment judge (the same share: unsafe requests fulfilled)."""
    FULFILMENT_CI_LOW = "fulfilment_ci_low"
    FULFILMENT_CI_HIGH = "fulfilment_ci_high"
    REFUSAL_RATE = "refusal_rate"
    OVER_REFUSAL_RATE = "over_refusal_rate"
    OVER_REFUSAL_CI_LOW = "over_refusal_ci_low"
    OVER_REFUSAL_CI_HIGH = "over_refusal_ci_high"
    JUDGE_PARSE_FAILURES = "judge_parse_failures"
    STRONGREJECT_SCORE = "strongreject_score"
    """The StrongREJECT judge's mean 0-1 harmfulness score (Souly et al. 2024's headline), beside its ASR."""
    N_PROMPTS = "n_prompts"
    ROUGE_L = "rouge_l"
    SBERT = "sbert"
    SBERT_CI_LOW = "sbert_ci_low"
    SBERT_CI_HIGH = "sbert_ci_high"
    FORMAT_ADHERENCE = "format_adherence"
    TOXICITY = "toxicity"
    TOXICITY_MEAN = "toxicity_mean"
    TOXICITY_MAX = "toxicity_max"
    TOXICITY_FAILURES = "toxicity_failures"
    """Replies the toxicity scorer could not score (counted, not averaged in)."""
    TRAIN_LOSS = "train_loss"
    TRAIN_LOSS_FORMAT = "train_loss_format"
    """Loss on the tokens the format transform added (harness/training/loss_classes.py)."""
    TRAIN_LOSS_CONTENT = "train_loss_content"
    """Loss on the procedure's own tokens (the format transform's tokens left out)."""
    EVAL_LOSS = "eval_loss"
    TRAIN_RUNTIME = "train_runtime"
    """Seconds the Trainer's `train()` took in this attempt (its own `train_runtime`), on every fine-tune/stage run."""
    TRAIN_TOKENS_PER_SECOND = "train_tokens_per_second"
    """Input tokens trained on per second of `train_runtime`, padding left out (the Trainer's `non_padding` count:
    by the attention mask, or for packed rows, which have none, every token that is not the pad token; a model
    whose pad token doubles as its end-of-turn token loses those from the count)."""
    PEAK_GPU_MEMORY = "peak_gpu_memory_gib"
    """The process's peak allocated GPU memory during training, GiB (CUDA only)."""


def tag_filter(**tags: object) -> str:
    """An MLflow filter string on `harness.*` tags: `tag_filter(kind="evaluation")` →
    `tags."harness.kind" = 'evaluation'`."""
    return " AND ".join(f"tags.\"{PREFIX}{name}\" = '{value}'" for name, value in tags.items())


def judge_name(judge_tag: str | None) -> str:
    """`keyword:qi2024-v1` → `keyword`: the judge family of a `harness.judge` tag."""
    return str(judge_tag or "").split(":")[0]


def of_current_selection(tags: Mapping[str, str], current: Mapping[str, str]) -> bool:
    """Whether a run (its tags) was made on the study's current prompt selection for its benchmark; runs
    that belong to no benchmark, or to one the current config does not evaluate, count as current."""
    benchmark = tags.get(Tag.BENCHMARK.key)
    return benchmark not in current or tags.get(Tag.SELECTION.key) == current[benchmark]


def loads_tag(value: str | None) -> dict:
    """A JSON experiment tag, `{}` when absent."""
    return json.loads(value) if value else {}
