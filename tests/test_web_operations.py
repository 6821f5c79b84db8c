"""The dashboard's operations panels in a real browser: a firing alert, an A/B route whose
winner is promoted from the page, and the usage table with its CSV export link."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from accounts_helpers import login, make_settings
from alert_helpers import FAST, fast_rules
from provider_helpers import write_providers
from server_helpers import running_server
from web_helpers import CHROMIUM_ARGS, DESKTOP, PASSWORD, chromium_path, is_loopback

from semilla.serve.app import create_app
from semilla.serve.registry import load_models

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def test_alerts_ab_and_usage_panels(tiny_run: Path, tmp_path: Path):
    providers = write_providers(
        tmp_path / "providers.yaml", "routes:\n  ab: {split: {tiny: 70, second: 30}}\n"
    )
    settings = make_settings(
        tmp_path, providers=providers, alert_rules=fast_rules(tmp_path / "r.yml"), **FAST
    )
    app = create_app(settings, load_models([("tiny", str(tiny_run)), ("second", str(tiny_run))]))
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=DESKTOP).new_page()
        page.set_default_timeout(15_000)
        remote: list[str] = []
        page.on("request", lambda r: None if is_loopback(r.url) else remote.append(r.url))
        page.goto(url + "/admin")
        page.fill("#auth-username", "ana")
        page.fill("#auth-password", PASSWORD)
        page.click("#auth-register")  # the first account: an admin
        expect(page.locator("#dashboard")).to_be_visible()

        with httpx.Client(base_url=url, timeout=60) as client:
            client.headers.update(login(client, "ana"))
            for i in range(4):
                body = {
                    "model": "ab",
                    "user": f"u{i}",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "Hola"}],
                }
                assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.delete("/admin/models/second").status_code == 204  # the variant is down

        page.reload()
        expect(
            page.locator('#alerts tr[data-alert="SemillaABVariantDown"][data-status="firing"]')
        ).to_be_visible()
        expect(page.locator("#alerts-health")).to_contain_text("health check: ok")
        ab = page.locator('#ab table[data-route="ab"]')
        expect(ab.locator("tr[data-variant]")).to_have_count(2)
        expect(ab.locator('tr[data-variant="second"]')).to_contain_text("no")
        expect(page.locator("#usage")).to_contain_text("tiny")
        page.select_option("#usage-by", "user")
        expect(page.locator("#usage")).to_contain_text("ana")
        expect(page.locator('a[href="/admin/usage?by=user&format=csv"]')).to_be_visible()

        ab.locator('tr[data-variant="tiny"] button').click()  # promote the winner
        expect(ab.locator("tr[data-variant]")).to_have_count(1)
        expect(page.locator('#ab tr[data-variant="tiny"]')).to_contain_text("winner")
        browser.close()
    assert remote == []
