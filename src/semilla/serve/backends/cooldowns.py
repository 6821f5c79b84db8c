"""Provider cooldowns shared by every replica through Redis (SEMILLA_REDIS_URL).

A `SharedBreaker` is chain.Breaker with its state in Redis: a provider's recent failures are
one counter (expiring `window_s` after the first of them) and its cooldown one key (expiring
when the cooldown ends), so a provider that failed on one replica is skipped by all of them,
and a failure on each of three replicas counts as three. Redis's own expiry times it: no
replica's clock matters. While Redis is down each replica keeps its own breaker, as without
Redis (the outage is logged once by the link).
"""

from __future__ import annotations

from semilla.serve.accounts.shared import DOWN, PREFIX, RedisLink
from semilla.serve.backends.chain import Breaker
from semilla.serve.providers import CooldownPolicy


class SharedBreaker(Breaker):
    def __init__(self, link: RedisLink, label: str, policy: CooldownPolicy):
        super().__init__(policy)
        self.link = link
        self.failures_key = f"{PREFIX}provider-failures:{label}"
        self.cooling_key = f"{PREFIX}provider-cooling:{label}"

    @property
    def available(self) -> bool:
        left_ms = self.link.call(lambda r: r.pttl(self.cooling_key))
        if left_ms is DOWN:
            return super().available
        return left_ms <= 0 and super().available  # -2: no key, -1: never (not set by us)

    def failed(self, retry_after: float | None = None) -> None:
        policy = self.policy

        def count(r) -> int:
            pipe = r.pipeline()  # (MULTI: atomic) the window starts at the first failure
            pipe.set(self.failures_key, 0, px=max(1, int(policy.window_s * 1000)), nx=True)
            pipe.incr(self.failures_key)  # keeps the expiry
            return pipe.execute()[1]

        failures = self.link.call(count)
        if failures is DOWN:
            return super().failed(retry_after)
        cool_s = policy.cooldown_s if failures >= policy.allowed_fails else 0.0
        cool_s = max(cool_s, retry_after or 0.0)  # the provider said how long to leave it alone
        if failures >= policy.allowed_fails:
            self.link.call(lambda r: r.delete(self.failures_key))
        if cool_s > 0:
            self.link.call(lambda r: self._cool(r, cool_s))

    def _cool(self, r, seconds: float) -> None:
        """Cool down for `seconds` from now, unless a longer cooldown is already running."""
        if r.pttl(self.cooling_key) < seconds * 1000:
            r.set(self.cooling_key, "1", px=max(1, int(seconds * 1000)))

    def succeeded(self) -> None:
        super().succeeded()
        self.link.call(lambda r: r.delete(self.failures_key))

    def state(self) -> dict:
        def read(r) -> tuple[int, int]:
            return r.pttl(self.cooling_key), int(r.get(self.failures_key) or 0)

        found = self.link.call(read)
        if found is DOWN:
            return super().state()
        left_ms, failures = found
        return {
            "cooling_down_s": round(left_ms / 1000, 3) if left_ms > 0 else 0.0,
            "recent_failures": failures,
        }
