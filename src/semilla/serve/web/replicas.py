"""The dashboard's counters summed over every replica that shares a Redis (SEMILLA_REDIS_URL).

Each replica's stats sampler publishes its own cumulative `Totals` (read from its Prometheus
registry) to Redis at every sample, under a key that expires after a few intervals, and reads
back every live replica's: the dashboard's points and totals are those of the sum, whichever
replica answers. A replica that stops publishing drops out of the sum once its key expires; a
restarted one starts again from zero (the points clamp what would go negative). While Redis is
down each replica shows its own counters, and the stats say so (`replicas: 1`, `shared: false`).
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from semilla.serve.accounts.shared import DOWN, PREFIX, RedisLink
from semilla.serve.web.stats import Totals

KEY = PREFIX + "stats:"
EXPIRY_INTERVALS = 3  # a replica silent this many sampling intervals is left out of the sum


def encode_totals(t: Totals) -> str:
    data = {**t.__dict__, "latency_buckets": {repr(k): v for k, v in t.latency_buckets.items()}}
    return json.dumps(data)


def decode_totals(raw: bytes | str) -> Totals:
    data = json.loads(raw)
    data["latency_buckets"] = {float(k): v for k, v in data["latency_buckets"].items()}
    return Totals(**data)


def sum_totals(parts: list[Totals], now: float) -> Totals:
    """One Totals of several replicas' (gauges summed too: slots and queues of all of them)."""
    out = Totals(time=now)
    for t in parts:
        for k, v in t.requests.items():
            out.requests[k] = out.requests.get(k, 0.0) + v
        for le, v in t.latency_buckets.items():
            out.latency_buckets[le] = out.latency_buckets.get(le, 0.0) + v
        out.tokens += t.tokens
        out.cache_hits += t.cache_hits
        out.cache_misses += t.cache_misses
        out.queue_depth += t.queue_depth
        out.active_slots += t.active_slots
        for name, counters in t.providers.items():
            mine = out.providers.setdefault(name, {})
            for k, v in counters.items():
                mine[k] = mine.get(k, 0.0) + v
    return out


class SharedTotals:
    """This replica's totals in Redis, and the sum of every live replica's."""

    def __init__(self, link: RedisLink, interval_s: float):
        self.link = link
        self.ttl_ms = int(EXPIRY_INTERVALS * interval_s * 1000)
        self.key = f"{KEY}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def combine(self, mine: Totals) -> tuple[Totals, int]:
        """Publish `mine`; (the sum over every live replica, how many), or (mine, 1) while
        Redis cannot be reached."""
        blob = encode_totals(mine)

        def exchange(r) -> list:
            r.set(self.key, blob, px=self.ttl_ms)
            keys = list(r.scan_iter(KEY + "*", count=1000))
            return [raw for raw in r.mget(keys) if raw is not None] if keys else []

        found = self.link.call(exchange)
        if found is DOWN or not found:
            return mine, 1
        return sum_totals([decode_totals(raw) for raw in found], mine.time), len(found)
