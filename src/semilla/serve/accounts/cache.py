"""Response cache: LRU with a time-to-live, bounded in entries and bytes.

Keys are SHA-256 over (caller scope, model, generation parameters, messages), so two callers
with identical prompts never share an entry. Hit, miss and eviction counters are Prometheus
metrics (served by /metrics) and `stats()` (served by GET /admin/cache).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import Counter, Gauge

HITS = Counter("semilla_cache_hits", "Response cache hits")
MISSES = Counter("semilla_cache_misses", "Response cache misses")
EVICTIONS = Counter("semilla_cache_evictions", "Response cache entries evicted (size or age)")
ENTRIES = Gauge("semilla_cache_entries", "Response cache entries held")
BYTES = Gauge("semilla_cache_bytes", "Approximate bytes held by the response cache")


def cache_key(scope: str, material: dict[str, Any]) -> str:
    blob = json.dumps({"scope": scope, "request": material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float, clock=time.monotonic):
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[float, int, Any]] = OrderedDict()  # key -> (expiry, size, value)
        self._bytes = 0
        self._lock = threading.Lock()
        self._clock = clock
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0 and self.ttl_s > 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0] <= self._clock():
                self._drop(key)
                item = None
            if item is None:
                self.misses += 1
                MISSES.inc()
                return None
            self._items.move_to_end(key)
            self.hits += 1
            HITS.inc()
            return item[2]

    def put(self, key: str, value: Any, size: int) -> None:
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (self._clock() + self.ttl_s, size, value)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
            self._publish()

    def _drop(self, key: str) -> None:
        self._bytes -= self._items.pop(key)[1]
        self.evictions += 1
        EVICTIONS.inc()
        self._publish()

    def _publish(self) -> None:
        ENTRIES.set(len(self._items))
        BYTES.set(self._bytes)

    def clear(self) -> int:
        with self._lock:
            n = len(self._items)
            self._items.clear()
            self._bytes = 0
            self._publish()
            return n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "ttl_s": self.ttl_s,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            }
