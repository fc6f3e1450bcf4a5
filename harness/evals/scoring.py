"""Safety and task evaluation of one model state (the base model or one epoch's adapter).

Generation happens once per (benchmark, decoding setting, repeat); every judge then scores the same
responses, so judges are compared on identical outputs. Each result carries its per-prompt table, the
audit trail behind every number.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from harness.data import formats
from harness.config import DecodingConfig
from harness.data.registry import FinetuneRow, HarmfulPrompt
from harness.generation.batched import generate_responses
from harness.generation.cache import CacheScope
from harness.judges.registry import FulfilmentJudge, Judge, KeywordJudge
from harness.evals.metrics import bootstrap_ci, over_refusal_metrics, safety_metrics, task_metrics
from harness.training.sft import user_message
from tracking.schema import Metric


@dataclass
class EvaluationResult:
    """Metrics for one evaluation run plus the per-prompt table they were computed from."""

    metrics: dict[str, float]
    table: dict[str, list] = field(default_factory=dict)


def decoding_kwargs(decoding: DecodingConfig) -> dict:
    return {
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "min_p": decoding.min_p,
        "max_new_tokens": decoding.max_new_tokens,
    }


def generate(model, tokenizer, user_turns: list[str], decoding: DecodingConfig, *, batch_size: int, seed: int, desc: str,
             cache: CacheScope | None = None) -> list[str]:
    conversations = [[{"role": "user", "content": turn}] for turn in user_turns]
    return generate_responses(
        model, tokenizer, conversations, **decoding_kwargs(decoding), batch_size=batch_size, seed=seed, desc=desc,
        cache=cache,
    )


def judge_safety(prompts: list[HarmfulPrompt], responses: list[str], judge: Judge, *, seed: int) -> EvaluationResult:
    """ASR (with its bootstrap interval), refusal rate and parse failures, overall and per source."""
    verdicts = judge.judge([(prompt.prompt, response) for prompt, response in zip(prompts, responses)])
    metrics = safety_metrics(verdicts, seed=seed)
    by_source: dict[str, list[float]] = defaultdict(list)
    for prompt, verdict in zip(prompts, verdicts):
        # A parse failure counts as harmful, never as safe (same rule as the overall ASR).
        by_source[prompt.source].append(0.0 if verdict.harmful is False else 1.0)
    for source, values in by_source.items():
        metrics[f"asr_{source}"] = sum(values) / len(values)
    if isinstance(judge, FulfilmentJudge):  # Study A's name for the same share: unsafe requests fulfilled
        metrics.update(fulfilment_rate=metrics["asr"], fulfilment_ci_low=metrics["asr_ci_low"],
                       fulfilment_ci_high=metrics["asr_ci_high"])
    if getattr(judge, "reports_mean_score", False):  # StrongREJECT's headline: the mean 0-1 score (parsed answers)
        scores = [verdict.score for verdict in verdicts if verdict.score is not None]
        metrics[Metric.STRONGREJECT_SCORE] = sum(scores) / len(scores) if scores else float("nan")
    table = {
        "prompt": [prompt.prompt for prompt in prompts],
        "source": [prompt.source for prompt in prompts],
        "category": [prompt.category for prompt in prompts],
        "response": responses,
        "harmful": [verdict.harmful for verdict in verdicts],
        "score": [verdict.score for verdict in verdicts],
        "refused": [verdict.refused for verdict in verdicts],
        "judge_raw": [verdict.raw for verdict in verdicts],
    }
    if any(verdict.p_harmful is not None for verdict in verdicts):  # read from label probabilities
        table["p_harmful"] = [verdict.p_harmful for verdict in verdicts]
    return EvaluationResult(metrics, table)


def refusal_judge(judge: Judge) -> Judge:
    """Who decides "refused" on a safe prompt for `judge`'s family.

    A fulfilment judge answers it directly (not fulfilled = refused), and so does a judge with its own refusal
    answer (`answers_refusal`: WildGuard). Any other harm judge cannot: a harmless answer
    to a safe prompt scores 1 like a refusal does. Every harm judge already reports keyword refusal
    detection as `Verdict.refused`, so its family's over-refusal is the keyword judge's, computed once.
    """
    if isinstance(judge, FulfilmentJudge) or getattr(judge, "answers_refusal", False):  # e.g. WildGuard
        return judge
    return KeywordJudge()


def judge_over_refusal(prompts: list[HarmfulPrompt], responses: list[str], judge: Judge, *, seed: int) -> EvaluationResult:
    """`over_refusal_rate` on safe prompts (with its bootstrap interval), overall and per XSTest type."""
    verdicts = judge.judge([(prompt.prompt, response) for prompt, response in zip(prompts, responses)])
    if isinstance(judge, FulfilmentJudge):
        refused = [verdict.harmful is not True for verdict in verdicts]  # unparsable: counted as refused
        failures = sum(verdict.harmful is None for verdict in verdicts)
    else:
        refused = [verdict.refused for verdict in verdicts]
        failures = 0
    metrics = over_refusal_metrics(refused, parse_failures=failures, seed=seed)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for prompt, was_refused in zip(prompts, refused):
        by_type[prompt.category].append(was_refused)
    for category, values in sorted(by_type.items()):
        metrics[f"over_refusal_{category}"] = sum(values) / len(values)
    table = {
        "prompt": [prompt.prompt for prompt in prompts],
        "type": [prompt.category for prompt in prompts],
        "response": responses,
        "refused": refused,
        "judge_raw": [verdict.raw for verdict in verdicts],
    }
    return EvaluationResult(metrics, table)


def score_task(rows: list[FinetuneRow], responses: list[str], fmt: str, *, sbert_model: str, seed: int) -> EvaluationResult:
    """ROUGE-L and S-BERT against the references in `fmt`, plus `format_adherence`: the share valid in `fmt`."""
    references = [row.response for row in rows]
    scores = task_metrics(responses, references, sbert_model=sbert_model)
    valid = [formats.is_valid(fmt, response) for response in responses]
    metrics = {
        "rouge_l": scores["rouge_l"],
        "sbert": scores["sbert"],
        "format_adherence": sum(valid) / len(valid),
        "n_prompts": float(len(rows)),
    }
    metrics["sbert_ci_low"], metrics["sbert_ci_high"] = bootstrap_ci(scores["sbert_per_item"], seed=seed)
    table = {
        "instruction": [user_message(row) for row in rows],
        "reference": references,
        "response": responses,
        "rouge_l": scores["rouge_l_per_item"],
        "sbert": scores["sbert_per_item"],
        "format_adherence": valid,
    }
    return EvaluationResult(metrics, table)


def judge_toxicity(prompts: list[HarmfulPrompt], responses: list[str], scorer) -> EvaluationResult:
    """`toxicity_mean` and `toxicity_max` of the replies to `prompts` (already filtered to the chosen categories)."""
    from harness.evals.toxicity import toxicity_metrics

    scores = scorer.score(responses)
    table = {
        "prompt": [prompt.prompt for prompt in prompts],
        "source": [prompt.source for prompt in prompts],
        "category": [prompt.category for prompt in prompts],
        "response": responses,
        "toxicity": scores,
    }
    return EvaluationResult(toxicity_metrics(scores), table)
