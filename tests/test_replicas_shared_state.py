"""Two real `semilla serve` replicas on one PostgreSQL and one Redis: the dashboard's counters
are summed over both, and a provider cooled down by one is skipped by the other."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis
from accounts_helpers import login, register
from provider_helpers import write_providers
from replica_helpers import replica, running_postgres, running_redis
from server_helpers import free_port, wait_until

from semilla.serve.accounts.shared import RedisLink
from semilla.serve.backends.cooldowns import SharedBreaker
from semilla.serve.providers import CooldownPolicy
from semilla.serve.web.replicas import SharedTotals, decode_totals, encode_totals, sum_totals
from semilla.serve.web.stats import Totals

SECRET = "r" * 48


def chat(client: httpx.Client, headers: dict, model: str = "tiny", tokens: int = 4) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hola"}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 1.0}  # fmt: skip
    r = client.post("/v1/chat/completions", headers=headers, json=body)
    assert r.status_code == 200, r.text
    return r


def test_totals_round_trip_and_sum():
    a = Totals(time=1.0, requests={"2xx": 3.0}, latency_buckets={0.1: 2.0, float("inf"): 3.0}, tokens=12.0,
               active_slots=1.0, providers={"dead": {"calls": 1.0}})  # fmt: skip
    b = Totals(time=2.0, requests={"2xx": 2.0, "4xx": 1.0}, latency_buckets={0.1: 1.0, float("inf"): 3.0},
               tokens=8.0, providers={"dead": {"skips": 1.0}})  # fmt: skip
    assert decode_totals(encode_totals(a)) == a
    both = sum_totals([a, b], now=5.0)
    assert both.requests == {"2xx": 5.0, "4xx": 1.0} and both.tokens == 20.0 and both.time == 5.0
    assert both.latency_buckets == {0.1: 3.0, float("inf"): 6.0} and both.active_slots == 1.0
    assert both.providers == {"dead": {"calls": 1.0, "skips": 1.0}}


def test_each_replica_publishes_its_totals_and_reads_the_sum():
    with running_redis() as (url, proc):
        a, b = SharedTotals(RedisLink(url), interval_s=5), SharedTotals(RedisLink(url), interval_s=5)
        assert a.combine(Totals(time=1.0, tokens=12.0)) == (Totals(time=1.0, tokens=12.0), 1)
        both, replicas = b.combine(Totals(time=2.0, tokens=8.0, requests={"2xx": 1.0}))
        assert replicas == 2 and both.tokens == 20.0 and both.requests == {"2xx": 1.0}
        assert 14_000 < redis.Redis.from_url(url).pttl(a.key) <= 15_000  # gone 3 intervals after a stops
        proc.kill()  # Redis gone: each replica shows its own counters
        proc.wait()
        assert a.combine(Totals(time=3.0, tokens=13.0)) == (Totals(time=3.0, tokens=13.0), 1)


def test_breakers_of_two_replicas_count_failures_and_cool_down_together():
    policy = CooldownPolicy(allowed_fails=2, cooldown_s=30, window_s=60)
    with running_redis() as (url, proc):
        a, b = SharedBreaker(RedisLink(url), "p", policy), SharedBreaker(RedisLink(url), "p", policy)
        a.failed()
        assert a.available and b.available and b.state()["recent_failures"] == 1
        b.failed()  # the second failure, on the other replica: both cool down
        assert not a.available and not b.available
        assert 29 < a.state()["cooling_down_s"] <= 30 and a.state()["recent_failures"] == 0
        other = SharedBreaker(RedisLink(url), "q", policy)  # another provider is not affected
        assert other.available
        other.failed(retry_after=0.2)  # Retry-After cools it down at once, for as long as it asks
        assert not SharedBreaker(RedisLink(url), "q", policy).available
        assert wait_until(lambda: other.available, timeout=5)

        proc.kill()  # Redis gone: each replica keeps its own breaker, as without Redis
        proc.wait()
        alone = SharedBreaker(RedisLink(url), "r", CooldownPolicy(allowed_fails=1, cooldown_s=30))
        assert alone.available
        alone.failed()
        assert not alone.available and alone.state()["cooling_down_s"] > 29


@pytest.mark.slow
def test_two_replicas_share_dashboard_counters_and_provider_cooldowns(tmp_path: Path, tiny_run: Path):
    providers = write_providers(
        tmp_path / "providers.yaml",
        f"providers:\n  dead: {{kind: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', model: m}}\n"
        "routes:\n  chain: dead -> tiny\n"
        "cooldown: {allowed_fails: 1, cooldown_s: 120, window_s: 60}\n",
    )
    with running_postgres() as pg, running_redis() as (redis_url, _):
        env = dict(SEMILLA_DATABASE_URL=pg.new_database("shared"), SEMILLA_REDIS_URL=redis_url,
                   SEMILLA_JWT_SECRET=SECRET, SEMILLA_PROVIDERS=str(providers), HOST="127.0.0.1")  # fmt: skip
        with (
            replica(tiny_run, tmp_path / "a", **env) as (_, a),
            replica(tiny_run, tmp_path / "b", **env) as (proc_b, b),
        ):
            ca, cb = httpx.Client(base_url=a, timeout=60), httpx.Client(base_url=b, timeout=60)
            register(ca, "root")
            admin = login(cb, "root")

            # the dead provider fails on a and is cooled down there: b skips it without calling it
            first = chat(ca, admin, model="chain")
            assert first.headers["x-semilla-provider"] == "tiny"
            second = chat(cb, admin, model="chain")
            assert second.headers["x-semilla-provider"] == "tiny"
            metrics_b = cb.get("/metrics", headers=admin).text
            assert 'semilla_provider_skips_total{provider="dead"} 1.0' in metrics_b
            assert 'semilla_provider_calls_total{provider="dead"}' not in metrics_b
            dead = next(
                p for p in cb.get("/admin/models", headers=admin).json()["providers"] if p["name"] == "dead"
            )
            assert 60 < dead["cooling_down_s"] <= 120

            # the dashboard of either replica counts the tokens generated on both
            answers = [first, second, chat(ca, admin), chat(ca, admin), chat(ca, admin), chat(cb, admin)]
            tokens = sum(r.json()["usage"]["completion_tokens"] for r in answers)
            assert tokens == 6 * 4

            def stats(client: httpx.Client) -> dict:
                return client.get("/admin/stats", headers=admin).json()

            def summed(client: httpx.Client) -> bool:
                s = stats(client)
                return s["replicas"] == 2 and s["totals"] is not None and s["totals"]["tokens"] == tokens

            assert wait_until(lambda: summed(ca), timeout=30, interval=0.5), stats(ca)
            assert wait_until(lambda: summed(cb), timeout=30, interval=0.5), stats(cb)
            providers_a = stats(ca)["totals"]["providers"]
            assert providers_a["dead"]["calls"] == 1 and providers_a["dead"]["skips"] == 1
            assert providers_a["tiny"]["successes"] == 2  # one answer of the chain on each replica

            # a replica that stops drops out of the sum once its entry expires
            proc_b.kill()
            proc_b.wait()
            assert wait_until(lambda: stats(ca)["replicas"] == 1, timeout=40, interval=0.5), stats(ca)
            assert stats(ca)["totals"]["tokens"] < tokens
