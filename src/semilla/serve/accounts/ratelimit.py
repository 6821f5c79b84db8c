"""Token buckets: requests per minute and generated tokens per minute, per caller.

A bucket holds up to `per_minute` units and refills continuously; a request takes one unit
(refused with the seconds until one is back), generated tokens are taken after the fact and
may drive the bucket negative, which refuses the caller's next requests until it refills.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_BUCKETS = 100_000  # idle callers are forgotten beyond this (oldest first)


@dataclass
class Bucket:
    level: float
    updated: float


class RateLimiter:
    """Buckets keyed by caller (e.g. 'user:3', 'ip:1.2.3.4'), each with its own per-minute rate."""

    def __init__(self, clock=time.monotonic):
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock

    def _bucket(self, key: str, per_minute: float, now: float) -> Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = Bucket(per_minute, now)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            b.level = min(per_minute, b.level + (now - b.updated) * per_minute / 60)
            b.updated = now
            self._buckets.move_to_end(key)
        return b

    def take(self, key: str, per_minute: float, amount: float = 1.0) -> float:
        """Take `amount` units; 0.0 when allowed, else the seconds to wait (nothing taken)."""
        if per_minute <= 0:
            return 0.0  # 0 means unlimited
        with self._lock:
            b = self._bucket(key, per_minute, self._clock())
            if b.level >= amount:
                b.level -= amount
                return 0.0
            return max(1.0, math.ceil((amount - b.level) * 60 / per_minute))

    def check(self, key: str, per_minute: float) -> float:
        """Seconds until the bucket is positive again (0.0 when it already is); takes nothing."""
        if per_minute <= 0:
            return 0.0
        with self._lock:
            b = self._bucket(key, per_minute, self._clock())
            return 0.0 if b.level > 0 else max(1.0, math.ceil(-b.level * 60 / per_minute + 1e-9))

    def spend(self, key: str, per_minute: float, amount: float) -> None:
        """Take `amount` even when it overdraws the bucket (tokens already generated)."""
        if per_minute <= 0:
            return
        with self._lock:
            self._bucket(key, per_minute, self._clock()).level -= amount

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
