"""An exact-match LRU cache of verdicts, keyed by everything a verdict depends on."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from .verdict import Verdict


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since creation (or the last :meth:`VerdictCache.clear`)."""

    hits: int
    misses: int
    size: int
    maxsize: int

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses), 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class VerdictCache:
    """Thread-safe LRU of successful verdicts. Failed verdicts are never stored.

    Keys are built by the Guard from (model, family, template version, surface, mode, text, context,
    history), so a template change or a different model never reuses a verdict.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if maxsize < 1:
            raise ValueError("cache maxsize must be at least 1 (pass cache=False to disable caching)")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: Hashable) -> Verdict | None:
        """The cached verdict, refreshed as most recent; None (and a miss counted) otherwise."""
        with self._lock:
            verdict = self._data.get(key)
            if verdict is None:
                self._misses += 1
                return None
            self._data.move_to_end(key)
            self._hits += 1
            return verdict

    def put(self, key: Hashable, verdict: Verdict) -> None:
        """Store a verdict (ignored when it carries an error)."""
        if verdict.error is not None:
            return
        with self._lock:
            self._data[key] = verdict
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def stats(self) -> CacheStats:
        """Current counters."""
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._data), self.maxsize)
