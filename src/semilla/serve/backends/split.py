"""A/B routes: a named route that splits traffic between variants (models, provider/models or
other routes) by weight, sticky per user.

Each caller goes to the variant of highest weighted rendezvous score for its key (the request's
`user` field, else its account, API key or address): the shares match the weights, a caller
keeps its variant, and when a variant cannot answer (unloaded) only its callers move, to the
rest in proportion to their weights. A variant that fails at request time is followed by the
others in the caller's order, as a fallback chain does. The answer carries `model_version`
(the variant) and `semilla_ab_*` metrics count each variant's requests, errors, tokens and
latency.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Callable

from semilla.serve import metrics
from semilla.serve.backends.base import Backend
from semilla.serve.backends.chain import (
    PROVIDER_HEADER,
    Breaker,
    FallbackChain,
    FallbackGeneration,
    provider_of,
)
from semilla.serve.errors import APIError
from semilla.serve.serving import ChoiceDelta, Generation, GenerationCall, Result

VARIANT_HEADER = "X-Semilla-Variant"


def unit_hash(*parts: str) -> float:
    """A number in (0, 1) fixed by `parts` and spread uniformly."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2**64


def rank_variants(route: str, weights: dict[str, float], key: str) -> list[str]:
    """The variants in `key`'s order of preference: the first is its variant (weighted rendezvous
    hashing: variant v wins with probability weights[v] / sum(weights))."""
    score = {v: -math.log(unit_hash(route, v, key)) / w for v, w in weights.items()}
    return sorted(weights, key=score.__getitem__)


class SplitRoute(Backend):
    def __init__(
        self,
        id: str,
        weights: dict[str, float],
        resolve: Callable[[str], Backend],
        breakers: Callable[[str], Breaker],
    ):
        super().__init__(id)
        self.weights, self.resolve, self.breakers = dict(weights), resolve, breakers

    def card(self, admin: bool = False) -> dict:
        return {**super().card(admin), "meta": {"split": dict(self.weights)}}

    @property
    def links(self) -> list[str]:
        return list(self.weights)

    def keep_only(self, variant: str) -> None:
        """All traffic to `variant` (a promoted winner); the others' gauges go."""
        for other in self.weights:
            if other != variant:
                with contextlib.suppress(KeyError):
                    metrics.AB_VARIANT_UP.remove(self.id, other)
        self.weights = {variant: 1.0}

    def available(self) -> dict[str, bool]:
        """Which variants can answer now (a local model unloaded cannot); sets semilla_ab_variant_up."""
        up = {}
        for variant in self.weights:
            try:
                self.resolve(variant)
                up[variant] = True
            except APIError:
                up[variant] = False
            metrics.AB_VARIANT_UP.labels(self.id, variant).set(float(up[variant]))
        return up

    def order(self, key: str) -> list[str]:
        """The variants to try for `key`: its own first, those that cannot answer left out
        (all of them, when none can: the error then names the first)."""
        up = self.available()
        live = {v: w for v, w in self.weights.items() if up[v]} or self.weights
        return rank_variants(self.id, live, key)

    def fits(self, messages: list[dict]) -> bool:
        try:
            return self.resolve(next(iter(self.weights))).fits(messages)
        except APIError:
            return True

    def chat(self, messages: list[dict], call: GenerationCall) -> Generation:
        return SplitGeneration(self, call, lambda backend: backend.chat(messages, call), messages)

    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> Generation:
        return SplitGeneration(self, call, lambda backend: backend.complete(prompt, call), list(prompt))


class SplitGeneration(Generation):
    """The caller's variant's generation (or the next one's, if it fails to start)."""

    def __init__(self, route: SplitRoute, call: GenerationCall, make: Callable[[Backend], Generation], texts):
        super().__init__(route.id, 0, call)
        self.route, self.texts = route, texts
        self.links = route.order(call.user_key)
        self.inner = FallbackGeneration(FallbackChain(route.id, self.links, route.resolve, route.breakers),
                                        call, make, texts)  # fmt: skip
        self.variant = self.links[0]
        self._counted = False

    async def start(self) -> None:
        try:
            await self.inner.start()
        except APIError:
            metrics.AB_REQUESTS.labels(self.route.id, self.variant).inc()
            metrics.AB_ERRORS.labels(self.route.id, self.variant).inc()
            raise
        label = self.inner.headers[PROVIDER_HEADER]
        self.variant = next(v for v in self.links if provider_of(v) == label)
        metrics.AB_REQUESTS.labels(self.route.id, self.variant).inc()
        self.model, self.fingerprint = self.inner.model, self.inner.fingerprint
        self.model_version = self.variant
        self.headers = {**self.inner.headers, VARIANT_HEADER: self.variant}
        self.choices = self.inner.choices

    def _done(self, failed: bool) -> None:
        if self._counted:
            return
        self._counted = True
        labels = (self.route.id, self.variant)
        metrics.AB_LATENCY.labels(*labels).observe(time.perf_counter() - self.started)
        metrics.AB_COMPLETION_TOKENS.labels(*labels).inc(sum(c.n_tokens for c in self.choices))
        if failed:
            metrics.AB_ERRORS.labels(*labels).inc()

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        failed = True
        try:
            async for delta in self.inner.deltas():
                yield delta
            failed = getattr(self.inner.inner, "failed", False)
        finally:
            self._done(failed)

    async def result(self) -> Result:
        try:
            result = await self.inner.result()
        except APIError:
            self._done(True)
            raise
        self._done(getattr(self.inner.inner, "failed", False))
        return result

    def cancel(self) -> None:
        self.inner.cancel()

    def finish(self) -> Result:
        return self.inner.finish()
