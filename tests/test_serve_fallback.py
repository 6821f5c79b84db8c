"""A fallback chain under load, every part a real server on loopback: an upstream of our own
that fails half its requests (500 and 429), a dead port, and a healthy semilla server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from accounts_helpers import make_settings
from provider_helpers import ANSWER, delta, provider_metrics, upstream_app, write_providers
from server_helpers import free_port, running_server

from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.web.stats import provider_totals, read_totals

REQUESTS = 1000


def test_a_thousand_requests_through_a_failing_chain_are_all_answered(tiny_run: Path, tmp_path: Path):
    flaky = upstream_app(lambda n: ("ok", "500", "ok", "429")[n % 4])  # half fail; a 429 asks for 1 s
    healthy_app = create_app(make_settings(tmp_path / "healthy"), load_models([("tiny", str(tiny_run))]))
    dead = free_port()
    with running_server(flaky) as flaky_url, running_server(healthy_app) as healthy_url:
        providers = write_providers(
            tmp_path / "providers.yaml",
            f"providers:\n"
            f"  flaky: {{kind: openai, base_url: '{flaky_url}/v1', model: m}}\n"
            f"  dead: {{kind: openai, base_url: 'http://127.0.0.1:{dead}/v1', model: m}}\n"
            f"  healthy: {{kind: openai, base_url: '{healthy_url}/v1', model: tiny}}\n"
            f"routes:\n  chain: flaky -> dead -> healthy\n"
            f"cooldown: {{allowed_fails: 3, cooldown_s: 5, window_s: 60}}\n",
        )
        app = create_app(make_settings(tmp_path / "front", providers=providers), {})
        names = ("flaky", "dead", "healthy")
        before = {name: provider_metrics(name) for name in names}
        with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            body = {"model": "chain", "messages": [{"role": "user", "content": "Hola"}], "max_tokens": 2,
                    "temperature": 0}  # fmt: skip

            def ask(i: int) -> tuple[int, str, str]:
                r = client.post("/v1/chat/completions", json=body)
                return r.status_code, r.headers.get("x-semilla-provider", ""), r.text

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(REQUESTS)))
            elapsed = time.monotonic() - started
        seen = {name: delta(provider_metrics(name), before[name]) for name in names}

    assert [status for status, _, _ in answers] == [200] * REQUESTS, next(
        t for s, _, t in answers if s != 200
    )
    by = {name: sum(1 for _, p, _ in answers if p == name) for name in names}
    assert by["flaky"] + by["healthy"] == REQUESTS and by["dead"] == 0
    assert sum(ANSWER in text for _, p, text in answers if p == "flaky") == by["flaky"]
    for name in names:  # every attempt either answered or failed, and the counts agree
        assert seen[name]["calls"] == seen[name]["successes"] + seen[name]["failures"], (name, seen[name])
        assert seen[name]["successes"] == by[name]
    # the flaky one failed about half its attempts, each failure handed to the next link, and it was
    # cooled down (skipped) instead of asked every time
    assert flaky.state.calls == seen["flaky"]["calls"] < REQUESTS
    assert 0.3 < seen["flaky"]["failures"] / seen["flaky"]["calls"] < 0.7
    assert seen["flaky"]["fallbacks"] == seen["flaky"]["failures"]
    assert seen["flaky"]["skips"] > 0 and seen["flaky"]["calls"] + seen["flaky"]["skips"] == REQUESTS
    # the dead port never answered, and was asked three times per cool-down (plus the requests
    # already under way when it cooled: 8 at once)
    assert seen["dead"]["successes"] == 0 and seen["dead"]["skips"] > 0
    assert seen["dead"]["calls"] <= (3 + 8) * (elapsed / 5 + 1)
    # the dashboard's totals carry the same counters (cumulative over this process)
    dashboard = provider_totals(read_totals().providers)
    assert (
        dashboard["dead"]["successes"] == 0
        and dashboard["dead"]["failures"] == dashboard["dead"]["calls"] > 0
    )
    assert dashboard["healthy"]["mean_latency_s"] > 0
    print(f"\n{REQUESTS} requests in {elapsed:.1f} s: {by}, flaky {seen['flaky']}, dead {seen['dead']}")
