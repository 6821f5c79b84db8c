"""State that server replicas share through Redis (SEMILLA_REDIS_URL): the rate-limit token
buckets and the response cache. Without a Redis URL each process keeps its own
(ratelimit.RateLimiter, cache.ResponseCache), as a single server does.

Each bucket is one Redis hash updated by a Lua script, so a take is atomic across replicas and
uses Redis's clock, not the replicas'. Cached responses are JSON under `semilla:cache:`, with
Redis's own expiry; Redis's `maxmemory` policy bounds them (cache_max_entries and
cache_max_bytes bound a process's own cache only).

Redis down mid-traffic: requests are still served, with this process's own buckets and cache,
and an error line says so once per outage (another when Redis is back). Redis is tried again
RETRY_S after a failure, so a dead Redis costs no request more than one connect timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from typing import Any

from semilla.serve.accounts.cache import HITS, MISSES, ResponseCache
from semilla.serve.accounts.ratelimit import RateLimiter

log = logging.getLogger("semilla.accounts")

RETRY_S = 5.0  # after a failure, this process's own state serves this long before Redis is tried again
TIMEOUT_S = 0.5  # connect and read timeout of every Redis call
PREFIX = "semilla:"
DOWN = object()  # what RedisLink.call returns while Redis cannot be reached

# KEYS[1]: the bucket; ARGV: per_minute, amount, mode (take | check | spend).
# Returns the seconds to wait (0: allowed), as a string (Redis would truncate a Lua number).
BUCKET_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local amount = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level = tonumber(saved[1]) or capacity
local updated = tonumber(saved[2]) or now
level = math.min(capacity, level + math.max(0, now - updated) * rate)
local wait = 0
if ARGV[3] == 'take' then
  if level >= amount then level = level - amount else wait = (amount - level) / rate end
elseif ARGV[3] == 'spend' then
  level = level - amount
elseif level <= 0 then
  wait = -level / rate + 0.000000001
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((capacity - level) / rate) + 1)
return tostring(wait)
"""


class RedisLink:
    """One Redis client and its health: `call` runs an operation on Redis, or returns DOWN
    (and logs the outage once) while Redis is unreachable."""

    def __init__(self, url: str):
        import redis

        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._errors = (redis.RedisError, OSError)
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    def call(self, operation):
        """operation(client)'s value, or DOWN when Redis cannot be reached right now."""
        if time.monotonic() < self._down_until:
            return DOWN
        try:
            value = operation(self.client)
        except self._errors as e:
            with self._lock:
                self._down_until = time.monotonic() + RETRY_S
                if not self._down:
                    self._down = True
                    log.error(
                        "!!! Redis at %s is unreachable (%s): rate limits and the response cache are "
                        "per process until it is back !!!",
                        self.url,
                        e,
                    )
            return DOWN
        if self._down:
            with self._lock:
                self._down = False
            log.warning("Redis at %s is back: rate limits and the cache are shared again", self.url)
        return value

    def check(self) -> None:
        """Raise when Redis does not answer (start-up: a wrong URL is an error, not a fallback)."""
        self.client.ping()


class SharedRateLimiter(RateLimiter):
    """RateLimiter's buckets in Redis, shared by every replica; its own while Redis is down."""

    def __init__(self, link: RedisLink):
        super().__init__()
        self.link = link
        self._script = link.client.register_script(BUCKET_SCRIPT)

    def _run(self, key: str, per_minute: float, amount: float, mode: str) -> float | None:
        bucket = PREFIX + "bucket:" + key
        wait = self.link.call(lambda _: self._script(keys=[bucket], args=[per_minute, amount, mode]))
        return None if wait is DOWN else float(wait)

    def take(self, key: str, per_minute: float, amount: float = 1.0) -> float:
        if per_minute <= 0:
            return 0.0
        wait = self._run(key, per_minute, amount, "take")
        if wait is None:
            return super().take(key, per_minute, amount)
        return max(1.0, math.ceil(wait)) if wait > 0 else 0.0

    def check(self, key: str, per_minute: float) -> float:
        if per_minute <= 0:
            return 0.0
        wait = self._run(key, per_minute, 0, "check")
        if wait is None:
            return super().check(key, per_minute)
        return max(1.0, math.ceil(wait)) if wait > 0 else 0.0

    def spend(self, key: str, per_minute: float, amount: float) -> None:
        if per_minute > 0 and self._run(key, per_minute, amount, "spend") is None:
            super().spend(key, per_minute, amount)

    def reset(self) -> None:
        super().reset()
        self.link.call(lambda r: [r.delete(k) for k in r.scan_iter(PREFIX + "bucket:*")])


class SharedResponseCache(ResponseCache):
    """ResponseCache's entries in Redis, shared by every replica; its own while Redis is down.
    Hits and misses are counted in Redis too, so GET /admin/cache reports all replicas."""

    def __init__(self, link: RedisLink, max_entries: int, max_bytes: int, ttl_s: float):
        super().__init__(max_entries, max_bytes, ttl_s)
        self.link = link

    def get(self, key: str) -> Any | None:
        raw = self.link.call(lambda r: r.get(PREFIX + "cache:" + key))
        if raw is DOWN:
            return super().get(key)
        counter = "hits" if raw is not None else "misses"
        self.link.call(lambda r: r.incr(PREFIX + "cache-stats:" + counter))
        (HITS if raw is not None else MISSES).inc()
        return None if raw is None else decode_result(raw)

    def put(self, key: str, value: Any, size: int) -> None:
        if not self.enabled or size > self.max_bytes:
            return
        blob = encode_result(value)
        stored = self.link.call(lambda r: r.set(PREFIX + "cache:" + key, blob, px=int(self.ttl_s * 1000)))
        if stored is DOWN:
            super().put(key, value, size)

    def clear(self) -> int:
        local = super().clear()
        shared = self.link.call(lambda r: sum(r.delete(k) for k in r.scan_iter(PREFIX + "cache:*")))
        return local + (0 if shared is DOWN else shared)

    def stats(self) -> dict[str, Any]:
        stats = super().stats()

        def shared(r) -> dict[str, Any]:
            hits, misses = (int(r.get(PREFIX + "cache-stats:" + c) or 0) for c in ("hits", "misses"))
            entries = sum(1 for _ in r.scan_iter(PREFIX + "cache:*", count=1000))
            return {"entries": entries, "hits": hits, "misses": misses, "shared": True}

        found = self.link.call(shared)
        if found is not DOWN:
            stats.update(found, bytes=None)
            lookups = found["hits"] + found["misses"]
            stats["hit_rate"] = round(found["hits"] / lookups, 4) if lookups else 0.0
        return stats


def encode_result(result: Any) -> bytes:
    """A serving.Result as JSON (no pickles: a shared cache must not run what it reads)."""
    return json.dumps(dataclasses.asdict(result)).encode()


def decode_result(raw: bytes) -> Any:
    from semilla.serve.serving import Choice, Result, TokenInfo

    def tokens(items: list[dict]) -> list[TokenInfo]:
        return [TokenInfo(**{**t, "top": [tuple(p) for p in t["top"]]}) for t in items]

    data = json.loads(raw)
    choices = [
        Choice(**{**c, "tokens": tokens(c["tokens"]), "pending": tokens(c.get("pending", []))})
        for c in data.pop("choices")
    ]
    data["prompt_logprobs"] = [tokens(p) for p in data.get("prompt_logprobs", [])]
    return Result(choices=choices, **data)
