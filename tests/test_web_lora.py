"""The chat page's LoRA parts in headless Chromium against a real server: the adapter picker
(adapters of the chosen model, from /v1/models), a request naming the adapter, the
conversation's domain, "Teach this conversation" running a real job to a served adapter, and
the LoRA files generated counter."""

from __future__ import annotations

import json
import re

import pytest
from lora_helpers import random_adapter, tiny_base
from server_helpers import running_server
from web_helpers import CHROMIUM_ARGS, DESKTOP, PASSWORD, chromium_path, is_loopback

from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (make browser)")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """An open-mode server: a tiny base with a short context and one adapter, 'med'."""
    root = tmp_path_factory.mktemp("web-lora")
    base = tiny_base(root / "base", block_size=64)
    med = random_adapter(base, root / "med")
    settings = ServerSettings(_env_file=None, data_dir=str(root / "data"), lora=f"med={med}", lora_job_iters=4,
                              max_slots=4)  # fmt: skip
    with running_server(create_app(settings, load_models([("tiny", str(base))]))) as base_url:
        yield base_url


def test_pick_an_adapter_tag_a_domain_and_teach_the_conversation(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=DESKTOP).new_page()
        page.set_default_timeout(20_000)
        remote, asked = [], []
        page.on("request", lambda r: None if is_loopback(r.url) else remote.append(r.url))
        page.on("request", lambda r: asked.append(json.loads(r.post_data)["model"])
                if r.url.endswith("/v1/chat/completions") else None)  # fmt: skip
        page.goto(url + "/")

        # adapters are not models of their own: they sit in the picker next to their parent
        expect(page.locator("#model option")).to_have_text([re.compile("^tiny")])
        expect(page.locator("#adapter option")).to_have_text(["no adapter", "med · LoRA"])
        expect(page.locator("#m-lora")).to_have_text("0")
        page.select_option("#adapter", "med")
        page.fill("#input", "hola")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant .meta")).not_to_be_empty()
        assert asked == ["med"]

        page.click("#teach")  # no domain yet: it says what is missing
        expect(page.locator("#teach-status")).to_contain_text("Choose a domain")
        page.fill("#domain", "Medicina")
        page.click("#teach")
        expect(page.locator("#teach-status")).to_contain_text("is ready", timeout=180_000)
        expect(page.locator("#teach-status a")).to_have_text(["download .safetensors", "PEFT zip"])
        expect(page.locator("#m-lora")).to_have_text("1")
        expect(page.locator("#adapter option")).to_have_text(
            ["no adapter", "med · LoRA", "tiny-medicina · LoRA"]
        )
        download = page.request.get(url + page.locator("#teach-status a").first.get_attribute("href"))
        assert download.ok and len(download.body()) > 100

        # the conversation keeps its domain and its adapter after a reload
        page.reload()
        page.locator("#conversations .conv-title").first.click()
        expect(page.locator("#domain")).to_have_value("medicina")
        expect(page.locator("#adapter")).to_have_value("med")
        expect(page.locator("#domains option")).to_have_count(1)

        # the dashboard lists the adapter as what it is (an admin's view: the first account)
        page.request.post(url + "/auth/register", data={"username": "ana", "password": PASSWORD})
        assert page.request.post(url + "/auth/login", form={"username": "ana", "password": PASSWORD}).ok
        page.goto(url + "/admin")
        expect(page.locator("#models tr.adapter")).to_have_count(2)
        expect(page.locator("#models tr.adapter").first).to_contain_text("LoRA adapter on tiny")
        expect(page.locator("#lora-stats")).to_have_text(
            "LoRA files generated: 1 · jobs: 1 succeeded · domains: 1 of 32"
        )
        assert remote == []
        browser.close()
