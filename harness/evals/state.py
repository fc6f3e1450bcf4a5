"""Evaluate one model state (the base model, or one epoch's adapter, with or without ProMoT's prompt), adding
only what its checkpoint run lacks.

Generation and judging are two stored steps, each a run under the checkpoint run:
- a `generation` run per (model state, benchmark prompt set, decoding setting, repeat), with every prompt and
  response as `generations.json`; its identity hashes the prompt texts themselves, so any change to which
  prompts are chosen (sources, counts, seeds, files) makes a new record beside the old one;
- an `evaluation` run per (generation, scoring): its identity is the generation's plus the judge and its
  version (template, model, threshold), or the format and S-BERT model, or the toxicity settings.

So a rerun of a finished study with a judge added generates nothing: it reads the stored responses back and
runs only the new judge; a decoding added generates only the new decoding's responses; a changed prompt
selection makes new generations and evaluations beside the old ones (`harness.selection` tells them apart, and
the study records which selection is current). The model is loaded only when something must be generated.

Generation goes through a flat request list (harness/generation/requests.py) to HF `generate` on the opened model
(harness/generation/engines.py; its CUDA fast path where it applies). Every generation run is tagged
`harness.engine` (`hf`). A record that names another engine in its identity (vLLM's, made before issue 22 removed
that engine) is never taken for an HF one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.config import config_hash
from harness.evals.benchmarks import Benchmark, EvaluationSetup, Scoring, active_benchmarks
from harness.errors import HarnessError
from harness.generation.cache import CacheScope
from harness.generation.engines import ENGINE, generate_hf
from harness.generation.requests import assign_results, build_requests
from tracking import RunHandle, Tracker
from tracking.schema import Kind, Tag

GENERATIONS_FILE = "generations.json"

ModelOpener = Callable[[], AbstractContextManager]
"""Opens the model state for generation: a context manager yielding (model, cache state id)."""


def panel_metric_names(labels: list[str]) -> list[str]:
    ordered = sorted(labels)
    return [f"panel_asr.{label}" for label in ordered] + [
        f"panel_kappa.{a}.{b}" for i, a in enumerate(ordered) for b in ordered[i + 1:]]


def panel_metrics(verdicts: dict[str, list]) -> dict[str, float]:
    """`panel_asr.<judge>` (an unreadable verdict counts as harmful, as in ASR) and `panel_kappa.<a>.<b>`: Cohen's
    kappa between two judges' verdicts on the same responses (NaN when both say one thing throughout)."""
    from harness.judges.validation import confusion, rates

    harmful = {label: np.array([value is not False for value in values]) for label, values in verdicts.items()}
    metrics = {f"panel_asr.{label}": float(values.mean()) for label, values in sorted(harmful.items())}
    ordered = sorted(harmful)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            metrics[f"panel_kappa.{a}.{b}"] = float(rates(**confusion(harmful[a], harmful[b]))["kappa"])
    return metrics


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def selection_hash(benchmark: str, prompts: list[str]) -> str:
    """`harness.selection`: which prompts a benchmark's runs were made on (the current config's, or older)."""
    return config_hash({"benchmark": benchmark, "prompts_sha256": prompts_sha256(prompts)})


@dataclass
class PlannedEvaluation:
    scoring: Scoring
    config_hash: str
    stored: object | None
    """The FINISHED evaluation run of this identity, if the store has it."""


@dataclass
class PlannedGeneration:
    """One generation record this state needs, and the evaluations to make from it."""

    benchmark: Benchmark
    prompts: list[str]
    decoding_index: int
    decoding: object
    repeat: int
    seed: int
    suffix: str
    identity: dict
    config_hash: str
    run_id: str | None
    """The FINISHED generation run of this identity: found in the store, or recorded by this invocation."""
    evaluations: list[PlannedEvaluation] = field(default_factory=list)

    @property
    def missing(self) -> list[PlannedEvaluation]:
        return [planned for planned in self.evaluations if planned.stored is None]


class StateEvaluator:
    """Evaluates model states of one study; `counts` tallies what was made and what was reused."""

    def __init__(self, tracker: Tracker, setup: EvaluationSetup, tokenizer):
        self.tracker = tracker
        self.setup = setup
        self.tokenizer = tokenizer
        self.counts: Counter = Counter()
        self.benchmarks = active_benchmarks(setup)

    def current_selection(self, score_formats: list[str]) -> dict[str, str]:
        """Benchmark → selection hash of the current config's prompts."""
        return {benchmark.name: selection_hash(benchmark.name, prompts)
                for benchmark in self.benchmarks if (prompts := benchmark.prompts(self.setup, score_formats))}

    def evaluate(self, parent_id: str, unit: dict, tags: dict, *, state_id: str, score_formats: list[str],
                 open_model: ModelOpener) -> dict[str, float]:
        """Make what is missing under checkpoint run `parent_id`; return the summary's headline metrics (first
        decoding setting, repeat 0) of the evaluations that match the current config."""
        plan = self.plan(parent_id, unit, tags, state_id=state_id, score_formats=score_formats)
        responses = self.generate_missing(parent_id, unit, tags, plan, open_model)
        headline: dict[str, float] = {}
        for generation in plan:
            verdicts: dict[str, list | None] = {}  # panel judge → its per-prompt harmful verdicts, when at hand
            for planned in generation.evaluations:
                if planned.stored is not None:
                    metrics = dict(planned.stored.data.metrics)
                    self.counts["evaluations_reused"] += 1
                    if planned.scoring.panel:
                        verdicts[planned.scoring.label] = None  # read back only if the panel must be computed
                else:
                    texts = responses.get(generation.config_hash)
                    if texts is None:
                        texts = responses[generation.config_hash] = self.stored_responses(generation)
                    result = self.record_evaluation(parent_id, unit, tags, generation, planned, texts)
                    metrics = result.metrics
                    self.counts["evaluations_new"] += 1
                    if planned.scoring.panel:
                        verdicts[planned.scoring.label] = result.table["harmful"]
                if generation.decoding_index == 0 and generation.repeat == 0:
                    headline.update(planned.scoring.headline(metrics))
            self.record_panel(generation, verdicts)
        return headline

    def record_panel(self, generation: PlannedGeneration, verdicts: dict[str, list | None]) -> None:
        """Every harm judge's ASR and each pair's Cohen's kappa on this generation's responses, on its run: whether
        judges agree about the same outputs is a finding of its own. Logged once per set of judges; a judge added
        later adds its pairs (stored verdicts are read back from their `per_prompt.json`)."""
        if len(verdicts) < 2:
            return
        wanted = panel_metric_names(list(verdicts))
        have = self.tracker.client.get_run(generation.run_id).data.metrics
        if all(name in have for name in wanted):
            return
        by_label = {planned.scoring.label: planned for planned in generation.evaluations}
        for label, harmful in verdicts.items():
            if harmful is None:
                verdicts[label] = self.stored_verdicts(by_label[label].stored.info.run_id)
        RunHandle(self.tracker.client, generation.run_id).log_metrics(panel_metrics(verdicts))

    def stored_verdicts(self, run_id: str) -> list:
        return [row["harmful"] for row in self.stored_table(run_id, "per_prompt.json", "evaluation")]

    def stored_table(self, run_id: str, name: str, kind: str) -> list[dict]:
        """The rows of a finished run's table artifact, or a one-line error saying how to make it again."""
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = self.tracker.client.download_artifacts(run_id, name, folder)
                table = json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception as error:
                raise HarnessError(f"{kind} run {run_id} has no readable {name} ({error}); delete that run in MLflow "
                                   "and rerun to make it again") from None
        return [dict(zip(table["columns"], row)) for row in table["data"]]

    # -- what exists, what is missing ---------------------------------------------------------------------
    def plan(self, parent_id: str, unit: dict, tags: dict, *, state_id: str,
             score_formats: list[str]) -> list[PlannedGeneration]:
        cfg = self.setup.cfg
        stored = {(run.data.tags.get(Tag.KIND.key), run.data.tags.get(Tag.CONFIG_HASH.key)): run
                  for run in self.tracker.search(f"tags.`mlflow.parentRunId` = '{parent_id}'")
                  if run.info.status == "FINISHED"}
        # Each benchmark's prompts and scorings, once: they do not depend on the decoding or the repeat.
        prompt_sets = [(benchmark, prompts, benchmark.scorings(self.setup, score_formats))
                       for benchmark in self.benchmarks if (prompts := benchmark.prompts(self.setup, score_formats))]
        plan = []
        for decoding_index, decoding in enumerate(cfg.eval.decoding):
            for repeat in range(decoding.repeats):
                seed = cfg.eval.seed + repeat
                suffix = f"T{decoding.temperature:g}" + (f"-r{repeat}" if decoding.repeats > 1 else "")
                suffix += "-with-prompt" if tags.get(Tag.SOFT_PROMPT) else ""
                for benchmark, prompts, scorings in prompt_sets:
                    identity = {"state": state_id, "benchmark": benchmark.name,
                                "prompts_sha256": prompts_sha256(prompts), "decoding": decoding.model_dump(mode="json"),
                                # no engine field: HF's records kept the identity they had before vLLM was a
                                # choice, and vLLM's (which named their engine) stay apart from them
                                "repeat": repeat, "seed_eval": seed}
                    digest = config_hash(identity)
                    found = stored.get((Kind.GENERATION, digest))
                    generation = PlannedGeneration(benchmark, prompts, decoding_index, decoding, repeat, seed, suffix,
                                                   identity, digest, found.info.run_id if found is not None else None)
                    for scoring in scorings:
                        eval_hash = config_hash({"generation": digest, **scoring.identity})
                        generation.evaluations.append(
                            PlannedEvaluation(scoring, eval_hash, stored.get((Kind.EVALUATION, eval_hash))))
                    plan.append(generation)
        return plan

    # -- generation records -------------------------------------------------------------------------------
    def generate_missing(self, parent_id: str, unit: dict, tags: dict, plan: list[PlannedGeneration],
                         open_model: ModelOpener) -> dict[str, list[str]]:
        """Generate every record that a missing evaluation needs and the store lacks: one `generate` call per
        (decoding, repeat) over all benchmarks' prompts, so batches stay full, each group recorded as it finishes.
        Returns hash → responses."""
        needed = [generation for generation in plan if generation.missing and generation.run_id is None]
        if not needed:
            return {}
        responses: dict[str, list[str]] = {}
        with open_model() as (model, cache_state):
            cache = self.setup_cache(cache_state)
            requests = build_requests(needed, self.tokenizer)
            for group, texts in generate_hf(model, self.tokenizer, requests, batch_size=self.setup.cfg.eval.batch_size,
                                            cache=cache):
                made = assign_results(needed, group, texts)
                for generation in needed:
                    if generation.config_hash in made:
                        responses[generation.config_hash] = made[generation.config_hash]
                        self.record_generation(parent_id, unit, tags, generation, responses[generation.config_hash])
        return responses

    def setup_cache(self, cache_state: str) -> CacheScope | None:
        cache = self.setup.generation_cache
        return CacheScope(cache, cache_state) if cache is not None else None

    def generation_tags(self, tags: dict, generation: PlannedGeneration) -> dict:
        return {**tags, Tag.ENGINE: ENGINE, Tag.TEMPERATURE: generation.decoding.temperature,
                Tag.MIN_P: generation.decoding.min_p,
                Tag.REPEAT: generation.repeat, Tag.BENCHMARK: generation.benchmark.name,
                Tag.SELECTION: selection_hash(generation.benchmark.name, generation.prompts)}

    def record_generation(self, parent_id: str, unit: dict, tags: dict, generation: PlannedGeneration,
                          responses: list[str]) -> None:
        config = {**unit, **generation.identity, **generation.benchmark.selection(self.setup)}
        with self.tracker.run(Kind.GENERATION, f"{generation.benchmark.name}-generations-{generation.suffix}",
                              self.generation_tags(tags, generation), parent=RunHandle(self.tracker.client, parent_id),
                              config=config, config_hash=generation.config_hash) as run:
            run.log_table({"prompt": generation.prompts, "response": responses}, GENERATIONS_FILE)
            run.log_metrics({"n_prompts": len(responses)})
            generation.run_id = run.run_id
        self.counts["generations_new"] += 1
        self.counts["prompts_generated"] += len(responses)

    def stored_responses(self, generation: PlannedGeneration) -> list[str]:
        """The responses of a FINISHED generation record, read back from its artifact."""
        run_id = generation.run_id
        rows = self.stored_table(run_id, GENERATIONS_FILE, "generation")
        if [row["prompt"] for row in rows] != generation.prompts:
            raise HarnessError(f"generation run {run_id}'s prompts differ from the ones its identity names")
        self.counts["generations_reused"] += 1
        return [row["response"] for row in rows]

    # -- judgements ---------------------------------------------------------------------------------------
    def record_evaluation(self, parent_id: str, unit: dict, tags: dict, generation: PlannedGeneration,
                          planned: PlannedEvaluation, responses: list[str]) -> dict[str, float]:
        benchmark, scoring = generation.benchmark, planned.scoring
        eval_tags = {**self.generation_tags(tags, generation), Tag.GENERATION_RUN: generation.run_id,
                     Tag.GENERATION_HASH: generation.config_hash, **scoring.tags}
        config = {**unit, "benchmark": benchmark.name, **benchmark.selection(self.setup),
                  "decoding": generation.decoding.model_dump(mode="json"), "repeat": generation.repeat,
                  "seed_eval": generation.seed, "generation": generation.config_hash, **scoring.identity}
        with self.tracker.run(Kind.EVALUATION, f"{benchmark.name}-{scoring.label}-{generation.suffix}", eval_tags,
                              parent=RunHandle(self.tracker.client, parent_id), config=config,
                              config_hash=planned.config_hash) as run:
            result = scoring.score(responses, generation.seed)
            run.log_metrics(result.metrics)
            run.log_table(result.table, "per_prompt.json")
        return result
