"""The dashboard's providers panel in headless Chromium: a chain whose first provider is a dead
port, answered by the local model; the panel shows each provider's counters and cooldown."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from accounts_helpers import build_app, login, make_settings, register, serve
from prometheus_client import REGISTRY
from provider_helpers import write_providers
from server_helpers import free_port
from web_helpers import CHROMIUM_ARGS, DESKTOP, PASSWORD, chromium_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (make browser)"),
]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def counts(provider: str) -> list[int]:
    """This process's calls, successes, failures, fallbacks and skips of `provider` so far."""
    names = ("calls", "successes", "failures", "fallbacks", "skips")
    return [
        int(sum(s.value for m in REGISTRY.collect() if m.name == f"semilla_provider_{name}"
                for s in m.samples if s.name.endswith("_total") and s.labels.get("provider") == provider))
        for name in names
    ]  # fmt: skip


def test_the_providers_panel_shows_counters_and_cooldowns(tmp_path: Path, tiny_run: Path):
    providers = write_providers(
        tmp_path / "providers.yaml",
        f"providers:\n  dead: {{kind: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', model: m}}\n"
        "routes:\n  chain: dead -> tiny\n"
        "cooldown: {allowed_fails: 1, cooldown_s: 300, window_s: 60}\n",
    )
    app = build_app(make_settings(tmp_path, providers=str(providers)), tiny_run)
    app.state.web_stats.interval_s = 0.5
    # the counters are the process's (Prometheus): other tests' servers may have used these names
    before = {name: counts(name) for name in ("dead", "tiny")}
    with serve(app) as url, sync_api.sync_playwright() as p:
        client = httpx.Client(base_url=url, timeout=60)
        register(client, "root", PASSWORD)
        body = {"model": "chain", "messages": [{"role": "user", "content": "Hola"}], "max_tokens": 2}
        for _ in range(2):  # the first falls back past the dead port, the second skips it
            r = client.post("/v1/chat/completions", headers=login(client, "root", PASSWORD), json=body)
            assert r.status_code == 200 and r.headers["x-semilla-provider"] == "tiny"

        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=DESKTOP).new_page()
        page.goto(url + "/admin")
        page.fill("#auth-username", "root")
        page.fill("#auth-password", PASSWORD)
        page.click("#auth-login")
        expect(page.locator("#providers-panel")).to_be_visible(timeout=20_000)
        expect(page.locator("#providers-scope")).to_contain_text("This server's counters")
        dead = page.locator('#providers tr[data-provider="dead"] td')
        # provider, calls, answered, failed, fell back, skipped, mean latency, state
        cooling = re.compile(r"cooling down \d+ s")
        calls, successes, failures, fallbacks, skips = before["dead"]
        expected = [calls + 1, successes, failures + 1, fallbacks + 1, skips + 1]
        expect(dead).to_have_text(["dead", *map(str, expected), "–", cooling], timeout=20_000)
        tiny = page.locator('#providers tr[data-provider="tiny"] td')
        expect(tiny.nth(1)).to_have_text(str(before["tiny"][0] + 2))
        expect(tiny.nth(2)).to_have_text(str(before["tiny"][1] + 2))
        expect(tiny.last).to_have_text("local model")
        browser.close()
