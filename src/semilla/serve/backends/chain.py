"""Fallback chains: a named route tries its links in order until one answers.

A link fails over to the next on a connection error, a timeout, a 5xx or a 429 (whatever a
`ProviderError` marks retryable, and a local model that is busy, broken or unloaded); any
other refusal (a 401, a 400) ends the request as the provider's error. A stream commits to a
link once its first delta arrives: before that a failure moves on, after it the client gets an
error event. A provider that failed `allowed_fails` times within `window_s` is skipped for
`cooldown_s` (or as long as its Retry-After asks), then tried again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from semilla.serve import metrics
from semilla.serve.backends.base import Backend
from semilla.serve.backends.remote import ProviderError, refuse_token_ids, retry_after_s
from semilla.serve.errors import APIError
from semilla.serve.providers import CooldownPolicy
from semilla.serve.serving import ChoiceDelta, Generation, GenerationCall, Result

TEMPLATES_FINGERPRINT = "semilla-templates"
TEMPLATES_HEADER = "X-Semilla-Fallback"
PROVIDER_HEADER = "X-Semilla-Provider"


class Breaker:
    """One provider's health, shared by every route that uses it."""

    def __init__(self, policy: CooldownPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        self.failures: deque[float] = deque()
        self.cooling_until = 0.0

    @property
    def available(self) -> bool:
        return self.clock() >= self.cooling_until

    def failed(self, retry_after: float | None = None) -> None:
        now = self.clock()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.policy.window_s:
            self.failures.popleft()
        if len(self.failures) >= self.policy.allowed_fails:
            self.cooling_until = max(self.cooling_until, now + self.policy.cooldown_s)
            self.failures.clear()
        if retry_after:  # the provider said how long to leave it alone
            self.cooling_until = max(self.cooling_until, now + retry_after)

    def succeeded(self) -> None:
        self.failures.clear()

    def state(self) -> dict:
        left = self.cooling_until - self.clock()
        return {"cooling_down_s": round(left, 3) if left > 0 else 0.0, "recent_failures": len(self.failures)}


def retryable(e: APIError) -> bool:
    """Whether the next link may answer instead: provider failures it marks so, and a local
    model that is busy (503), broken (500) or gone (unloaded)."""
    if isinstance(e, ProviderError):
        return e.retryable
    return e.status >= 500 or e.status == 429 or e.code == "model_not_found"


def failure_reason(e: APIError) -> str:
    return e.reason if isinstance(e, ProviderError) else "status"


class FallbackChain(Backend):
    """A named route: `links` are model names (a local id, provider/model, 'templates') that
    `resolve` turns into backends at each request, so a reloaded or unloaded one is seen at once."""

    def __init__(
        self,
        id: str,
        links: list[str],
        resolve: Callable[[str], Backend],
        breakers: Callable[[str], Breaker],
    ):
        super().__init__(id)
        self.links, self.resolve, self.breakers = links, resolve, breakers

    def card(self, admin: bool = False) -> dict:
        return {**super().card(admin), "meta": {"route": list(self.links)}}

    def fits(self, messages: list[dict]) -> bool:
        try:
            return self.resolve(self.links[0]).fits(messages)
        except APIError:
            return True

    def chat(self, messages: list[dict], call: GenerationCall) -> Generation:
        return FallbackGeneration(self, call, lambda backend: backend.chat(messages, call), messages)

    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> Generation:
        refuse_token_ids(self.id, prompt, call)
        return FallbackGeneration(self, call, lambda backend: backend.complete(prompt, call), list(prompt))

    def skips_cooling(self) -> bool:
        """Whether links cooling down are skipped now: not when every one is (better to try)."""
        return any(self.breakers(provider_of(link)).available for link in self.links)


def provider_of(link: str) -> str:
    """The metric and cooldown label of a link: the provider's name, or a local model's id."""
    return link.partition("/")[0]


class FallbackGeneration(Generation):
    """The first link's generation that starts (streams: that yields a delta) or answers."""

    def __init__(
        self, chain: FallbackChain, call: GenerationCall, make: Callable[[Backend], Generation], texts
    ):
        super().__init__(chain.id, 0, call)
        self.chain, self.make, self.texts = chain, make, texts
        self.inner: Generation | None = None
        self._first: ChoiceDelta | None = None
        self._rest: AsyncIterator[ChoiceDelta] | None = None
        self._result: Result | None = None

    async def start(self) -> None:
        failures: list[tuple[str, APIError]] = []
        links, skip_cooling = self.chain.links, self.chain.skips_cooling()
        for i, link in enumerate(links):
            label = provider_of(link)
            breaker = self.chain.breakers(label)
            if skip_cooling and not breaker.available:
                metrics.PROVIDER_SKIPS.labels(label).inc()
                continue
            metrics.PROVIDER_CALLS.labels(label).inc()
            began = time.perf_counter()
            gen = None
            try:
                gen = self.make(self.chain.resolve(link))
                await gen.start()
                if self.call.stream:
                    self._rest = gen.deltas()
                    self._first = await anext(self._rest, None)
                else:
                    self._result = await gen.result()
            except APIError as e:
                if gen is not None:
                    gen.cancel()
                metrics.PROVIDER_FAILURES.labels(label, failure_reason(e)).inc()
                if not retryable(e):
                    raise
                breaker.failed(getattr(e, "retry_after", None) or retry_after_s(e.headers.get("Retry-After")))
                failures.append((label, e))
                if i + 1 < len(links):
                    metrics.PROVIDER_FALLBACKS.labels(label).inc()
                continue
            breaker.succeeded()
            metrics.PROVIDER_SUCCESSES.labels(label).inc()
            metrics.PROVIDER_LATENCY.labels(label).observe(time.perf_counter() - began)
            self._adopt(gen, label)
            return
        raise self._exhausted(failures)  # (every link failed or was cooling down)

    def _adopt(self, gen: Generation, label: str) -> None:
        self.inner, self.model, self.fingerprint = gen, gen.model, gen.fingerprint
        self.headers = {**gen.headers, PROVIDER_HEADER: label}
        self.choices, self.texts = gen.choices, gen.texts

    def _exhausted(self, failures: list[tuple[str, APIError]]) -> APIError:
        """Every link failed: 504 when the last one timed out, else 502, naming each failure."""
        if not failures:  # those left after a failure were all cooling down
            return APIError(503, f"every provider of {self.chain.id!r} is cooling down; retry shortly",
                            type="provider_error", code="provider_unavailable", headers={"Retry-After": "1"})  # fmt: skip
        last = failures[-1][1]
        if len(self.chain.links) == 1:  # a provider named directly: its own error says it all
            return last
        timeout = last.status == 504
        summary = "; ".join(f"{label}: {e.message}" for label, e in failures)
        return APIError(
            504 if timeout else 502,
            f"no provider of {self.chain.id!r} answered ({summary})",
            type="provider_error",
            code="provider_timeout" if timeout else "provider_unavailable",
        )

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        if self._result is not None:  # answered whole (not streaming): its choices in one piece
            for c in self._result.choices:
                yield ChoiceDelta(c.index, c.text, [], c.finish_reason)
            return
        assert self._rest is not None, "start() first"
        try:
            if self._first is not None:
                yield self._first
            async for delta in self._rest:
                yield delta
        finally:  # a client that leaves frees the link's work now, not when collected
            await self._rest.aclose()

    async def result(self) -> Result:
        if self._result is not None:
            return self._result
        return await super().result()

    def cancel(self) -> None:
        if self.inner is not None:
            self.inner.cancel()

    def finish(self) -> Result:
        if self._result is not None:
            return self._result
        assert self.inner is not None
        return self.inner.finish()


class TemplateBackend(Backend):
    """The last resort: a fixed answer, marked by its fingerprint and a response header."""

    def __init__(self, answer: str):
        super().__init__("templates")
        self.answer = answer

    def chat(self, messages: list[dict], call: GenerationCall) -> Generation:
        return TemplateGeneration(self, call, messages)

    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> Generation:
        return TemplateGeneration(self, call, list(prompt))


class TemplateGeneration(Generation):
    fingerprint = TEMPLATES_FINGERPRINT

    def __init__(self, backend: TemplateBackend, call: GenerationCall, texts: list):
        super().__init__(backend.id, call.n, call)
        self.answer, self.texts = backend.answer, texts
        self.headers = {TEMPLATES_HEADER: "templates"}

    async def start(self) -> None:
        metrics.TEMPLATE_ANSWERS.inc()

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        for choice in self.choices:
            choice.text, choice.finish_reason = self.answer, "stop"
            yield ChoiceDelta(choice.index, self.answer, [], "stop")
