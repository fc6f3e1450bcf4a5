"""Named points where a test can kill the harness with a real signal, to prove that a rerun loses nothing.

`HARNESS_KILL_AT=POINT:N` sends SIGKILL (no clean-up, like a pre-empted job or the OOM killer) to this
process the N-th time execution passes POINT; `HARNESS_INTERRUPT_AT=POINT:N` sends SIGINT (Ctrl-C) instead.
Points: `train_step` (a training step was logged), `checkpoint` (a checkpoint run finished),
`generation_batch` (a batch of generations was cached), `judge_batch` (a batch of judge answers was cached,
or read from label probabilities).
Unset, `reached` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("train_step", "checkpoint", "generation_batch", "judge_batch")
_passes: Counter = Counter()


def _target(variable: str) -> tuple[str, int] | None:
    value = os.environ.get(variable)
    if not value:
        return None
    point, _, count = value.partition(":")
    if point not in POINTS or not count.isdigit():
        raise ValueError(f"{variable} must be POINT:N with POINT one of {', '.join(POINTS)}, got {value!r}")
    return point, int(count)


def reached(point: str) -> None:
    """Count a pass through `point`; deliver the configured signal on the configured pass."""
    _passes[point] += 1
    for variable, sig in (("HARNESS_KILL_AT", signal.SIGKILL), ("HARNESS_INTERRUPT_AT", signal.SIGINT)):
        target = _target(variable)
        if target == (point, _passes[point]):
            os.kill(os.getpid(), sig)
