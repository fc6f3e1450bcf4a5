"""Generations kept on disk, so an interrupted evaluation resumes where it stopped and a repeated one is free.

An entry is keyed by everything that determines its texts: the model state that generated them (base model
digest, adapter digest, soft-prompt digest), the prompts' token ids, the decoding options and the seed. The
unit is a *batch*, not a prompt: left padding makes a batch's outputs depend on its members, and a rerun
forms the same batches (prompts are sorted deterministically), so a cached batch is exactly what the
uninterrupted run produced. Judge models go through the same generation code, so their answers are cached
the same way.

SQLite writes are transactions: a crash leaves an entry whole or absent, never half-written, and several
processes may share one file (WAL journal, busy timeout).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

_SCHEMA = "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, texts TEXT NOT NULL)"


class GenerationCache:
    """A SQLite table from a content key to the list of texts one generation call (or batch) produced."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise HarnessError(f"cannot open the generation cache {self.path}: {error}") from None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts: Any) -> str:
        """A stable digest of JSON-able parts (model state, prompt ids, decoding options, seed)."""
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str, expected: int) -> list[str] | None:
        """The cached texts, or None; an entry of the wrong length (never written by this code) is ignored."""
        row = self._db.execute("SELECT texts FROM generations WHERE key = ?", (key,)).fetchone()
        texts = json.loads(row[0]) if row else None
        if not isinstance(texts, list) or len(texts) != expected:
            self.misses += 1
            return None
        self.hits += 1
        return texts

    def put(self, key: str, texts: list[str]) -> None:
        try:
            with self._db:  # one transaction: the entry is written whole or not at all
                self._db.execute("INSERT OR REPLACE INTO generations (key, texts) VALUES (?, ?)", (key, json.dumps(texts)))
        except sqlite3.OperationalError as error:  # disk full, read-only file system, ...
            raise HarnessError(f"cannot write the generation cache {self.path}: {error}") from None

    def count(self) -> int:
        """Entries stored (a method, not __len__: an empty cache must still be truthy)."""
        return self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class CacheScope:
    """A cache bound to the model state that is generating: what `generate_responses` takes."""

    cache: GenerationCache
    model_state: str
    """Identifies the weights: e.g. base digest + adapter digest (+ soft-prompt digest)."""

    def key(self, prompts: list[list[int]], decoding: dict[str, Any], seed: int) -> str:
        return self.cache.key(model_state=self.model_state, prompts=prompts, decoding=decoding, seed=seed)


def file_digest(*paths: str | Path) -> str:
    """sha256 over the bytes of files (an adapter's weights), for a model-state key."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
