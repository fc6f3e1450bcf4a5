"""How a run computes: the config's `runtime:` section, environment overrides, and the process-wide current one.

These settings (ProMoT's precision, attention and micro-batches; the fast training and generation paths) change
kernels, numerics and batching, not what is trained: the same examples, steps and losses up to floating point.
So they are not part of any unit's identity (a config hash does not change with them, and a finished unit is
reused whatever they were), but every run records them (`Runtime.tags`), since they can explain a difference
between two runs of the same unit (issue 12: bf16 ProMoT went non-finite where fp32 did not).

Each setting comes from the config (`RuntimeConfig`) unless its environment variable (`ENV`) is set, which
then wins and is recorded as an override. `resolve` does this once; the runner `activate`s the result for the
study, and library code reads `current()`. Outside a study (tests, `harness bench`) nothing is activated and
`current()` resolves the defaults and the environment afresh on every call, as the code read `os.environ` before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

from harness.config import RuntimeConfig
from harness.errors import HarnessError
from tracking.schema import Tag

ENV = {
    "promot_precision": "HARNESS_PROMOT_PRECISION",
    "promot_attention": "HARNESS_PROMOT_ATTENTION",
    "promot_micro_batch": "HARNESS_PROMOT_MICRO_BATCH",
    "fast_training": "HARNESS_FAST_TRAINING",
    "fast_generation": "HARNESS_FAST_GENERATION",
}
"""Each `runtime:` setting's environment variable; a set (non-empty) one overrides the config."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NO_MICRO_BATCH = ("off", "none")


@dataclass(frozen=True)
class Runtime:
    """Resolved `runtime:` settings, and which of them came from the environment."""

    promot_precision: str = "fp32"
    promot_attention: str = "sdpa"
    promot_micro_batch: int | None = None
    fast_training: bool = True
    fast_generation: bool = True
    from_env: frozenset[str] = field(default_factory=frozenset)
    """Names of the settings (keys of ENV) that an environment variable set."""

    def settings(self) -> RuntimeConfig:
        return RuntimeConfig(**{name: getattr(self, name) for name in ENV})

    def source(self, name: str) -> str:
        """Where a setting came from, for messages: its environment variable, or `runtime.<name>`."""
        return ENV[name] if name in self.from_env else f"runtime.{name}"

    def overrides(self) -> list[str]:
        """The environment variables that overrode the config, in ENV's order."""
        return [variable for name, variable in ENV.items() if name in self.from_env]

    def switched_off(self, name: str) -> str | None:
        """For a fast-path switch: why it is off (`switched off by HARNESS_FAST_TRAINING`), or None when on."""
        return None if getattr(self, name) else f"switched off by {self.source(name)}"

    def tags(self) -> dict[str, str]:
        """Full `harness.*` tag names and values recording these settings on a run.

        `runtime` (the settings as JSON) and `runtime_overrides` (the overriding variables, or `none`), and each
        setting under its own tag, with the values those tags have always had: `promot_precision` fp32|bf16,
        `promot_attention` sdpa|eager, `promot_micro_batch` N|off, `fast_training` and `fast_generation` `on` or
        `off: <why>`. Where a run knows more (ProMoT on the CPU: `fp32 (cpu)`; a ProMoT fine-tune: fast training
        `off: not used by promot`), the tag it sets afterwards replaces these.
        """
        from harness.training.fast_training import fast_training_unavailable  # torch: loaded only when a run is tagged

        training_off = fast_training_unavailable(self)
        generation_off = self.switched_off("fast_generation")
        if generation_off is None:
            import torch

            generation_off = None if torch.cuda.is_available() else "not on CUDA"
        return {
            Tag.RUNTIME.key: json.dumps(self.settings().model_dump(mode="json"), sort_keys=True),
            Tag.RUNTIME_OVERRIDES.key: ",".join(self.overrides()) or "none",
            Tag.PROMOT_PRECISION.key: self.promot_precision,
            Tag.PROMOT_ATTENTION.key: self.promot_attention,
            Tag.PROMOT_MICRO_BATCH.key: str(self.promot_micro_batch) if self.promot_micro_batch else "off",
            Tag.FAST_TRAINING.key: "on" if training_off is None else f"off: {training_off}",
            Tag.FAST_GENERATION.key: "on" if generation_off is None else f"off: {generation_off}",
        }


def _parse(name: str, raw: str) -> object:
    """An environment variable's value for setting `name`; a bad one is a one-line error naming the variable."""
    variable, value = ENV[name], raw.strip().lower()
    annotation = RuntimeConfig.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        if value in choices:
            return value
        allowed = ", ".join(choices)
    elif annotation is bool:
        if value in _TRUE or value in _FALSE:
            return value in _TRUE
        allowed = "1, 0, true, false, yes, no, on, off"
    else:  # the micro-batch: a positive integer, or off
        if value in _NO_MICRO_BATCH:
            return None
        if value.isdigit() and int(value) >= 1:
            return int(value)
        allowed = "a positive integer, or off"
    raise HarnessError(f"{variable}={raw!r} is not allowed: use {allowed}")


def resolve(settings: RuntimeConfig) -> Runtime:
    """The config's settings with every set environment variable (ENV) applied over them, and which were."""
    values = settings.model_dump()
    from_env = set()
    for name, variable in ENV.items():
        raw = os.environ.get(variable)
        if raw is not None and raw.strip():
            values[name] = _parse(name, raw)
            from_env.add(name)
    checked = RuntimeConfig.model_validate(values)  # the parsed values are valid: this only normalises them
    return Runtime(**checked.model_dump(), from_env=frozenset(from_env))


_active: Runtime | None = None


def activate(runtime: Runtime | None) -> Runtime | None:
    """Make `runtime` the process's current one (None: back to resolving the environment on every call);
    returns the one it replaces."""
    global _active
    previous, _active = _active, runtime
    return previous


@contextmanager
def activated(runtime: Runtime) -> Iterator[Runtime]:
    """`runtime` is current inside the block; the previous one is restored after it."""
    previous = activate(runtime)
    try:
        yield runtime
    finally:
        activate(previous)


def current() -> Runtime:
    """The activated runtime; with none activated, the defaults with the environment's overrides, read now."""
    return _active if _active is not None else resolve(RuntimeConfig())
