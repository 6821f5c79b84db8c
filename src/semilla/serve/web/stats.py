"""The dashboard's time series: Prometheus counters sampled into an in-memory ring buffer.

Every `interval_s` the sampler reads the process's Prometheus registry (the same numbers
`/metrics` serves) and keeps one point per interval: requests per minute, status classes,
latency P50/P95/P99 (interpolated from the histogram buckets as Prometheus'
`histogram_quantile()` does), generated tokens/s, queue depth, active slots and cache hit
rate. The buffer holds `capacity` points (an hour at 5 s) and is lost on restart; a long
history is Prometheus' job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

# The web UI's own pages, assets and this endpoint: not traffic the dashboard should chart.
UNCOUNTED_ROUTES = frozenset({"/", "/admin", "/keys", "/static", "/admin/stats"})
QUANTILES = (0.5, 0.95, 0.99)
# a gRPC status as the HTTP status class it stands for (serve/rpc/service.py maps them)
GRPC_STATUS_CLASS = {"OK": "2xx"} | dict.fromkeys(
    ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "ALREADY_EXISTS",
     "RESOURCE_EXHAUSTED", "CANCELLED"), "4xx",
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """Cumulative counters at one instant (gauges are instantaneous)."""

    time: float
    requests: dict[str, float] = field(default_factory=dict)  # status class ('2xx') -> count
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    tokens: float = 0.0
    cache_hits: float = 0.0
    cache_misses: float = 0.0
    queue_depth: float = 0.0
    active_slots: float = 0.0
    providers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> counter -> value


PROVIDER_COUNTERS = {  # sample name -> key in the dashboard's per-provider totals
    "semilla_provider_calls_total": "calls",
    "semilla_provider_successes_total": "successes",
    "semilla_provider_failures_total": "failures",
    "semilla_provider_fallbacks_total": "fallbacks",
    "semilla_provider_skips_total": "skips",
    "semilla_provider_latency_seconds_sum": "latency_sum_s",
}


def read_totals(registry: CollectorRegistry = REGISTRY, now: float | None = None) -> Totals:
    """Sum semilla's metrics over every label except the web UI's own routes."""
    t = Totals(time=time.time() if now is None else now)
    for family in registry.collect():
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if labels.get("route") in UNCOUNTED_ROUTES:
                continue
            if name == "semilla_requests_total":
                kind = labels.get("status", "0")[:1] + "xx"
                t.requests[kind] = t.requests.get(kind, 0.0) + value
            elif name == "grpc_server_handled_total":  # gRPC calls count as the requests they are
                kind = GRPC_STATUS_CLASS.get(labels.get("grpc_code", ""), "5xx")
                t.requests[kind] = t.requests.get(kind, 0.0) + value
            elif name in ("semilla_request_latency_seconds_bucket", "grpc_server_handling_seconds_bucket"):
                le = float(labels["le"])
                t.latency_buckets[le] = t.latency_buckets.get(le, 0.0) + value
            elif name == "semilla_generated_tokens_total":
                t.tokens += value
            elif name == "semilla_cache_hits_total":
                t.cache_hits += value
            elif name == "semilla_cache_misses_total":
                t.cache_misses += value
            elif name == "semilla_queue_depth":
                t.queue_depth += value
            elif name == "semilla_active_slots":
                t.active_slots += value
            elif name in PROVIDER_COUNTERS:
                counters = t.providers.setdefault(labels["provider"], {})
                key = PROVIDER_COUNTERS[name]
                counters[key] = counters.get(key, 0.0) + value
    return t


def provider_totals(providers: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per provider: calls, successes, failures, fallbacks, skips and the mean latency."""
    out = {}
    for name, c in sorted(providers.items()):
        answered = c.get("successes", 0.0)
        row = {k: int(c.get(k, 0.0)) for k in ("calls", "successes", "failures", "fallbacks", "skips")}
        row["mean_latency_s"] = round(c.get("latency_sum_s", 0.0) / answered, 6) if answered else None
        out[name] = row
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as sorted (upper bound, cumulative count) pairs,
    linearly interpolated inside its bucket; None when the histogram is empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):  # past the last finite bound: that bound is all we know
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def point_between(before: Totals, after: Totals) -> dict[str, Any]:
    """One chart point: what happened between two readings."""
    dt = max(after.time - before.time, 1e-9)
    status = {k: after.requests.get(k, 0.0) - before.requests.get(k, 0.0) for k in after.requests}
    status = {k: int(round(v)) for k, v in sorted(status.items()) if v > 0}
    requests = sum(status.values())
    buckets = sorted(
        (le, after.latency_buckets[le] - before.latency_buckets.get(le, 0.0)) for le in after.latency_buckets
    )
    latency = {f"p{round(q * 100)}": bucket_quantile(q, buckets) for q in QUANTILES}
    hits, misses = after.cache_hits - before.cache_hits, after.cache_misses - before.cache_misses
    return {
        "time": round(after.time, 3),
        "requests": requests,
        "requests_per_min": round(requests * 60 / dt, 3),
        "status": status,
        "latency_s": {k: None if v is None else round(v, 6) for k, v in latency.items()},
        "tokens_per_s": round(max(after.tokens - before.tokens, 0.0) / dt, 3),
        "queue_depth": after.queue_depth,
        "active_slots": after.active_slots,
        "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses > 0 else None,
    }


class StatsSampler:
    """A ring buffer of chart points, filled by `run()` (an asyncio task) or by `sample()`."""

    def __init__(
        self,
        interval_s: float = 5.0,
        capacity: int = 720,
        registry: CollectorRegistry = REGISTRY,
        shared=None,  # web.replicas.SharedTotals: sum every replica's counters (Redis)
    ):
        self.interval_s, self.registry, self.shared = interval_s, registry, shared
        self.points: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._last: Totals | None = None
        self.replicas = 1  # how many replicas the figures sum
        self._lock = threading.Lock()

    def sample(self) -> dict[str, Any] | None:
        """Read the registry now; append and return the point since the previous reading."""
        totals, replicas = read_totals(self.registry), 1
        if self.shared is not None:
            totals, replicas = self.shared.combine(totals)
        with self._lock:
            before, self._last, self.replicas = self._last, totals, replicas
            if before is None or went_back(before, totals):  # a replica left or restarted: start anew
                return None
            point = point_between(before, totals)
            self.points.append(point)
            return point

    async def run(self) -> None:
        while True:
            try:
                if self.shared is None:
                    self.sample()
                else:  # a Redis round trip (up to its timeout): off the event loop
                    await asyncio.to_thread(self.sample)
            except Exception:  # one bad sample must not freeze the dashboard for good
                log.exception("stats sample failed")
            await asyncio.sleep(self.interval_s)

    def series(self) -> dict[str, Any]:
        """The buffered points and the cumulative totals, as GET /admin/stats answers."""
        with self._lock:
            points = list(self.points)
            last = self._last
        totals = None
        if last is not None:
            lookups = last.cache_hits + last.cache_misses
            totals = {
                "requests": int(sum(last.requests.values())),
                "status": {k: int(v) for k, v in sorted(last.requests.items())},
                "tokens": int(last.tokens),
                "cache_hit_rate": round(last.cache_hits / lookups, 4) if lookups else None,
                "providers": provider_totals(last.providers),
            }
        return {"object": "stats", "interval_s": self.interval_s, "replicas": self.replicas, "points": points,
                "totals": totals}  # fmt: skip


def went_back(before: Totals, after: Totals) -> bool:
    """Whether cumulative counters fell between two readings (summed replicas: one left)."""
    return sum(after.requests.values()) < sum(before.requests.values()) or after.tokens < before.tokens
