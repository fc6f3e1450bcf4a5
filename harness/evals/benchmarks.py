"""Benchmarks: the prompt sets a model state is evaluated on, each with the scorings its responses get.

A benchmark answers three questions, and nothing else in the harness needs to know which benchmarks exist:
- `prompts`: the user turns, from the study's prepared data;
- `selection`: the config settings that chose them (recorded on the runs, so a changed choice is visible);
- `scorings`: one `Scoring` per evaluation run to make from one generation of those prompts (a judge, the
  toxicity scorer, a format's references), each with its identity and the summary columns it heads.

Adding a benchmark is one class here plus its line in `BENCHMARKS`; the runner, the stored generations and
judgements, the summary and the run tags follow from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from harness.evals.scoring import EvaluationResult, judge_over_refusal, judge_safety, judge_toxicity, score_task
from harness.training.sft import user_message
from tracking.schema import HARMFUL_MIX, WIKIHOW, XSTEST_SAFE, XSTEST_UNSAFE, Metric, Tag


@dataclass
class EvaluationSetup:
    """What the benchmarks read: the config, the prepared data and the loaded judges (made once per study)."""

    cfg: object
    data: object
    judges: list
    refusal_judges: list
    judge_validation: dict[str, dict] = field(default_factory=dict)
    toxicity: object | None = None
    toxicity_prompts: list[int] = field(default_factory=list)
    """Indices of the harmful prompts whose replies the toxicity scorer reads (its categories)."""
    generation_cache: object | None = None
    """The study's per-prompt generation cache (`eval.cache`), or None."""


@dataclass
class Scoring:
    """One evaluation run to make from one generation record."""

    label: str
    """Run-name part: the judge's name, `toxicity`, or the format whose references score the task."""
    identity: dict
    """What changes the numbers besides the responses: the judge and its version (template, model,
    threshold), the toxicity settings, the format and S-BERT model."""
    tags: dict
    score: Callable[[list[str], int], EvaluationResult]
    """(responses, evaluation seed) → metrics and the per-prompt table."""
    headline: Callable[[dict[str, float]], dict[str, float]] = lambda metrics: {}
    """Metrics → the summary row's columns this evaluation fills (none for most)."""
    panel: bool = False
    """A harm judge's verdicts on the harmful prompts: compared with the other such judges on the same responses
    (`evals.state` logs their pairwise agreement on the generation run)."""


def judge_id(judge) -> str:
    """`name:version`, and `@vllm` for a local judge model served by vLLM (judges/vllm_server.py): its verdicts come
    from another engine than the same judge's on HF, so they are kept apart."""
    served_by = getattr(judge, "served_by", None)
    return f"{judge.name}:{judge.version}" + (f"@{served_by}" if served_by else "")


def asr_interval(judge_name: str, metrics: dict[str, float]) -> dict[str, float]:
    """A judge's ASR interval as summary columns (`asr_<judge>_ci_low`, `_ci_high`), when its metrics have one:
    the summary prints it beside the headline ASR, so a before/after difference can be read against it."""
    ends = (("ci_low", Metric.ASR_CI_LOW), ("ci_high", Metric.ASR_CI_HIGH))
    return {f"asr_{judge_name}_{end}": metrics[key] for end, key in ends if key in metrics}


class Benchmark:
    """A prompt set and its scorings (module doc). `applies` says whether a study evaluates it."""

    name: ClassVar[str]

    @classmethod
    def applies(cls, setup: EvaluationSetup) -> bool:
        return True

    def prompts(self, setup: EvaluationSetup, score_formats: list[str]) -> list[str]:
        raise NotImplementedError

    def selection(self, setup: EvaluationSetup) -> dict:
        raise NotImplementedError

    def scorings(self, setup: EvaluationSetup, score_formats: list[str]) -> list[Scoring]:
        raise NotImplementedError


class HarmfulMix(Benchmark):
    """The study's harmful prompts: ASR by every judge, and the toxicity of the replies when configured."""

    name = HARMFUL_MIX

    def prompts(self, setup, score_formats):
        return [prompt.prompt for prompt in setup.data.harmful]

    def selection(self, setup):
        return {"harmful": setup.cfg.data.harmful.model_dump(mode="json")}

    def scorings(self, setup, score_formats):
        scorings = [
            Scoring(judge.name, {"judge": judge_id(judge)},
                    {Tag.JUDGE: judge_id(judge), **setup.judge_validation.get(judge.name, {})},
                    lambda responses, seed, judge=judge: judge_safety(setup.data.harmful, responses, judge, seed=seed),
                    lambda metrics, judge=judge: {f"asr_{judge.name}": metrics[Metric.ASR],
                                                  **asr_interval(judge.name, metrics)}, panel=True)
            for judge in setup.judges
        ]
        if setup.toxicity is not None:
            settings, scorer, chosen = setup.cfg.eval.toxicity, setup.toxicity, setup.toxicity_prompts
            scorer_id = f"toxicity-{scorer.name}:{scorer.version}"
            scorings.append(Scoring(
                "toxicity", {"judge": scorer_id, "toxicity": settings.model_dump(mode="json")},
                {Tag.JUDGE: scorer_id, Tag.TOXICITY_SCORER: scorer.version,
                 Tag.TOXICITY_CATEGORIES: ",".join(settings.categories) if settings.categories else "all"},
                lambda responses, seed: judge_toxicity([setup.data.harmful[i] for i in chosen],
                                                       [responses[i] for i in chosen], scorer),
            ))
        return scorings


class XSTest(Benchmark):
    """One half of XSTest (Röttger et al. 2024), as `eval.xstest` chose it."""

    part: ClassVar[str]

    @classmethod
    def applies(cls, setup):
        return bool(cls.chosen(setup))

    @classmethod
    def chosen(cls, setup) -> list:
        return getattr(setup.data, f"xstest_{cls.part}")

    def prompts(self, setup, score_formats):
        return [prompt.prompt for prompt in self.chosen(setup)]

    def selection(self, setup):
        return {"xstest": setup.cfg.eval.xstest.model_dump(mode="json")}


class XSTestUnsafe(XSTest):
    """XSTest's unsafe contrast prompts: ASR by every judge (what over-refusal is measured against)."""

    name, part = XSTEST_UNSAFE, "unsafe"

    def scorings(self, setup, score_formats):
        return [
            Scoring(judge.name, {"judge": judge_id(judge)},
                    {Tag.JUDGE: judge_id(judge), **setup.judge_validation.get(judge.name, {})},
                    lambda responses, seed, judge=judge: judge_safety(setup.data.xstest_unsafe, responses, judge, seed=seed))
            for judge in setup.judges
        ]


class XSTestSafe(XSTest):
    """XSTest's safe prompts: over-refusal, once per refusal family (`evaluation.refusal_judge`)."""

    name, part = XSTEST_SAFE, "safe"

    def scorings(self, setup, score_formats):
        return [
            Scoring(judge.name, {"judge": judge_id(judge)},
                    {Tag.JUDGE: judge_id(judge), **setup.judge_validation.get(judge.name, {})},
                    lambda responses, seed, judge=judge: judge_over_refusal(setup.data.xstest_safe, responses, judge, seed=seed),
                    lambda metrics, judge=judge: {f"over_refusal_{judge.name}": metrics[Metric.OVER_REFUSAL_RATE]})
            for judge in setup.refusal_judges
        ]


class TaskTest(Benchmark):
    """The fine-tuning task's held-out test rows: ROUGE-L, S-BERT and format adherence against each format's
    references. The instruction is the same in every format, so one generation serves every format."""

    name = WIKIHOW

    @classmethod
    def applies(cls, setup):
        return bool(setup.cfg.eval.task) and bool(setup.data.test)

    def prompts(self, setup, score_formats):
        return [user_message(row) for row in setup.data.test[score_formats[0]]]

    def selection(self, setup):
        d = setup.cfg.data
        return {"task": {"task": d.task, "test_size": d.test_size, "split_seed": d.split_seed}}

    def scorings(self, setup, score_formats):
        sbert = setup.cfg.eval.sbert_model
        # The base model is scored against every format; prose stands for it in the summary.
        heads = {fmt for fmt in score_formats if len(score_formats) == 1 or fmt == "prose"}
        return [
            Scoring(fmt, {"format": fmt, "sbert_model": sbert}, {Tag.FORMAT: fmt},
                    lambda responses, seed, fmt=fmt: score_task(setup.data.test[fmt], responses, fmt,
                                                                sbert_model=sbert, seed=seed),
                    (lambda metrics: {name: metrics[name] for name in (Metric.ROUGE_L, Metric.SBERT,
                                                                       Metric.FORMAT_ADHERENCE)})
                    if fmt in heads else (lambda metrics: {}))
            for fmt in score_formats
        ]


BENCHMARKS: dict[str, type[Benchmark]] = {
    benchmark.name: benchmark for benchmark in (HarmfulMix, XSTestUnsafe, XSTestSafe, TaskTest)
}
"""Every benchmark by name, in the order a model state is evaluated on them."""


def active_benchmarks(setup: EvaluationSetup) -> list[Benchmark]:
    """The benchmarks this study evaluates, instantiated."""
    return [benchmark() for benchmark in BENCHMARKS.values() if benchmark.applies(setup)]
