"""The web client over plain HTTP: pages and their security headers, the stats endpoint, the sampler."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from server_helpers import running_server

from semilla.serve.app import create_app
from semilla.serve.settings import ServerSettings
from semilla.serve.web import chat_url
from semilla.serve.web.routes import CSP
from semilla.serve.web.stats import StatsSampler, bucket_quantile


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("web-pages")
    settings = ServerSettings(_env_file=None, data_dir=str(data / "data"), runs_dir=str(data / "runs"))
    with running_server(create_app(settings, {})) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/admin", "/keys"])
def test_pages_are_html_with_a_strict_policy(server, path):
    r = server.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ):
        assert directive in CSP
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in r.text and "style=" not in r.text  # nothing inline for the policy to allow
    assert "http://" not in r.text and "https://" not in r.text  # nothing remote


def test_assets_are_served_locally(server):
    for name in (
        "chat.js",
        "rag.js",
        "admin.js",
        "keys.js",
        "common.js",
        "markdown.js",
        "charts.js",
        "providers.js",
        "style.css",
    ):
        r = server.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", name
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in r.text, (name, sink)  # text goes in as text nodes only
    assert server.get("/static/nope.js").status_code == 404


def test_stats_need_an_admin(server):
    assert server.get("/admin/stats").status_code == 401  # even in open mode
    server.post("/auth/register", json={"username": "ana", "password": "correct horse battery"})
    server.post("/auth/register", json={"username": "bob", "password": "correct horse battery"})
    server.post("/auth/login", data={"username": "bob", "password": "correct horse battery"})
    assert server.get("/admin/stats").status_code == 403
    server.post("/auth/login", data={"username": "ana", "password": "correct horse battery"})
    stats = server.get("/admin/stats").json()
    assert stats["object"] == "stats" and stats["interval_s"] > 0 and isinstance(stats["points"], list)


def test_quantiles_interpolate_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.5)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.3)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.99)
    assert bucket_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert bucket_quantile(0.9, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0  # beyond the last bound


def test_the_sampler_turns_counters_into_rates():
    registry = CollectorRegistry()
    requests = Counter("semilla_requests", "r", ["route", "method", "status"], registry=registry)
    latency = Histogram(
        "semilla_request_latency_seconds", "l", ["route"], buckets=(0.1, 1.0), registry=registry
    )
    sampler = StatsSampler(interval_s=1.0, registry=registry)
    assert sampler.sample() is None  # the first reading is the baseline
    for status, seconds in (("200", 0.05), ("200", 0.5), ("429", 0.05), ("200", 0.05)):
        requests.labels("/v1/chat/completions", "POST", status).inc()
        latency.labels("/v1/chat/completions").observe(seconds)
    requests.labels("/static", "GET", "200").inc(100)  # the web UI's own assets are not traffic
    point = sampler.sample()
    assert point["requests"] == 4 and point["status"] == {"2xx": 3, "4xx": 1}
    assert point["latency_s"]["p50"] == pytest.approx(0.1 * 2 / 3, rel=1e-3)
    assert point["cache_hit_rate"] is None and point["tokens_per_s"] == 0
    assert sampler.series()["totals"]["requests"] == 4


def test_the_chat_url_is_reachable_from_this_machine():
    assert chat_url(ServerSettings(_env_file=None, host="0.0.0.0", port=8000)) == "http://127.0.0.1:8000/"
    assert chat_url(ServerSettings(_env_file=None, host="::1", port=9)) == "http://[::1]:9/"
