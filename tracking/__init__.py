"""The MLflow layer: where runs live, how they nest, which tags they carry, and how to query them back.

`Tracker`, `RunHandle` and `resolve_tracking_uri` load on first use: importing `tracking.schema` (the run
schema's names) does not import MLflow, which takes seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracking.runs import RunHandle, Tracker
    from tracking.store import resolve_tracking_uri

__all__ = ["RunHandle", "Tracker", "resolve_tracking_uri"]
_HOMES = {"RunHandle": "tracking.runs", "Tracker": "tracking.runs", "resolve_tracking_uri": "tracking.store"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
