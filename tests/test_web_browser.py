"""The web client end to end: headless Chromium against a real server on loopback.

One server (a tiny trained model, plus an untrained long-context one that is slow enough to
stop mid-reply) and one browser for the module; the tests run in file order and share the
accounts they create: the first registered account (ana) is the admin, bob is a user.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch
from helpers import tiny_configs
from server_helpers import running_server, wait_until
from web_helpers import CHROMIUM_ARGS, DESKTOP, PASSWORD, PHONE, chromium_path, is_loopback, screenshot_dir

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (make browser)"),
]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

PAYLOADS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=alert('img')>",
    "[click me](javascript:alert('link'))",
    "<b onmouseover=alert('raw')>raw html</b><iframe src=http://203.0.113.7/></iframe>",
    "![remote](http://203.0.113.7/pixel.png)",
    '<img src="https://203.0.113.7/beacon.gif">',
]
HOSTILE = "\n\n".join(PAYLOADS)


@pytest.fixture(scope="module")
def web(tmp_path_factory, prepared_dir, corpus_text):
    """(base URL, app): a tiny model trained here with a 256-token context, and 'long'."""
    from semilla.train import train

    root = tmp_path_factory.mktemp("web")
    overrides = dict(block_size=256, max_iters=40, eval_interval=10, log_interval=2, save_interval=40)
    train(*tiny_configs(prepared_dir, root / "runs" / "tiny-chat", n_embd=64, **overrides))
    torch.manual_seed(0)
    tok = Tokenizer.train_char([corpus_text])
    long = build_model(
        ModelConfig(vocab_size=tok.vocab_size, block_size=4096, n_layer=2, n_head=2, n_embd=64)
    )
    save_checkpoint(root / "long", long, tok)
    models = load_models([("tiny-chat", str(root / "runs" / "tiny-chat")), ("long", str(root / "long"))])
    settings = ServerSettings(
        _env_file=None, data_dir=str(root / "data"), runs_dir=str(root / "runs"), max_slots=4,
        auth_attempts_per_minute=1000, rate_limit_rpm={"anonymous": 10_000, "user": 10_000, "admin": 10_000},
    )  # fmt: skip
    app = create_app(settings, models)
    app.state.web_stats.interval_s = 0.5  # enough points for the charts within a test
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watch:
    """Everything a page did that it must not: dialogs opened, requests off this machine."""

    def __init__(self, page):
        self.dialogs: list[str] = []
        self.remote: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: None if is_loopback(r.url) else self.remote.append(r.url))

    def assert_clean(self):
        assert self.dialogs == [] and self.remote == []


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    pg.watch = Watch(pg)
    yield pg
    pg.watch.assert_clean()
    context.close()


def sign_in(page, url: str, username: str, register: bool = False, path: str = "/?signin") -> None:
    page.goto(url + path)
    page.fill("#auth-username", username)
    page.fill("#auth-password", PASSWORD)
    page.click("#auth-register" if register else "#auth-login")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator(".who")).to_contain_text(username)


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply_done(page) -> None:
    """Until the newest reply is finished (its meta line is written) and Send is back."""
    expect(page.locator(".msg.assistant").last.locator(".meta")).not_to_be_empty()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()


def chat(page, text: str) -> None:
    """Send `text` and wait for the reply to it."""
    before = page.locator(".msg.assistant").count()
    send(page, text)
    expect(page.locator(".msg.assistant")).to_have_count(before + 1)
    wait_reply_done(page)


# --- chat --------------------------------------------------------------------------------------


def test_open_mode_chats_without_an_account(web, page):
    url, _ = web
    page.goto(url + "/")
    expect(page.locator(".who")).to_have_text("open mode")
    expect(page.locator("#model option")).to_have_count(2)
    send(page, "Hola")
    expect(page.locator(".msg.user")).to_have_text(re.compile("Hola"))
    wait_reply_done(page)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator("#m-messages")).to_have_text("2")


def test_register_chat_stream_stop_rate_and_find_it_after_a_reload(web, page):
    url, app = web
    sign_in(page, url, "ana", register=True)  # the first account: admin
    expect(page.locator("#conversations li")).to_have_count(0)  # open mode's chat is not ana's

    # Shift+Enter is a new line, Enter sends; the reply streams from the trained model
    page.fill("#input", "Hola")
    page.press("#input", "Shift+Enter")
    page.type("#input", "caballero")
    assert page.input_value("#input") == "Hola\ncaballero"
    page.press("#input", "Enter")
    wait_reply_done(page)
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("tokens")
    expect(page.locator("#m-tokens")).not_to_have_text("0")
    expect(page.locator("#m-avg")).to_contain_text(" s")
    expect(page.locator("#m-rate")).to_contain_text("tok/s")

    # rate it, with a comment: stored against the completion the server recorded
    reply.locator(".rate-up").click()
    reply.locator(".feedback textarea").fill("buen comienzo")
    reply.locator(".feedback button[type=submit]").click()
    expect(reply.locator(".thanks")).to_be_visible()
    mine = page.request.get(url + "/feedback").json()["data"]
    assert [(f["rating"], f["text"]) for f in mine] == [(1, "buen comienzo")]
    assert mine[0]["completion_id"].startswith("chatcmpl-")

    # a long reply from the slow model: watch it grow token by token, then stop it
    page.select_option("#model", "long")
    page.click("#toggle-settings")
    page.fill("#max_tokens", "3000")
    page.click("#toggle-settings")
    # min_tokens (a semilla extension the page does not expose) keeps the untrained model from
    # ending early; the request still goes to the real server
    page.route("**/v1/chat/completions", lambda route: route.continue_(
        post_data=json.dumps(json.loads(route.request.post_data) | {"min_tokens": 3000})))  # fmt: skip
    send(page, "Cuenta una historia larga")
    streaming = page.locator(".msg.assistant").last
    expect(page.locator("#stop")).to_be_visible()
    wait_until(lambda: len(streaming.locator(".body").inner_text()) > 20, timeout=10)
    first = len(streaming.locator(".body").inner_text())
    wait_until(lambda: len(streaming.locator(".body").inner_text()) > first + 20, timeout=10)
    assert len(streaming.locator(".body").inner_text()) > first  # it streams
    page.click("#stop")
    wait_reply_done(page)
    expect(streaming).to_have_class(re.compile("stopped"))
    expect(streaming.locator(".meta")).to_contain_text("stopped")
    assert len(streaming.inner_text()) < 3000
    page.unroute("**/v1/chat/completions")
    page.click("#toggle-settings")
    page.fill("#max_tokens", "")  # back to auto: 3000 does not fit tiny-chat's context
    page.click("#toggle-settings")
    engine = app.state.semilla.engine
    assert wait_until(lambda: not engine.workers["long"].active, timeout=2)  # the slot is free

    # reload: the conversation is in the list and holds the kept turn
    page.reload()
    items = page.locator("#conversations li")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Hola")
    items.first.locator(".conv-title").click()
    expect(page.locator(".msg.user").first).to_have_text(re.compile("Hola\\s+caballero"))
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.assistant .rate-up")).to_be_visible()

    # rename and delete through the list
    items.first.get_by_role("button", name=re.compile("^Rename")).click()
    page.fill(".conv-rename", "Primera charla")
    page.press(".conv-rename", "Enter")
    expect(items.first).to_contain_text("Primera charla")
    page.click("#new-chat")
    chat(page, "Otra")
    expect(items).to_have_count(2)
    items.filter(has_text="Otra").get_by_role("button", name=re.compile("^Delete")).click()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Primera charla")


def test_regenerate_and_copy(web, page):
    url, _ = web
    sign_in(page, url, "ana")
    page.click("#toggle-settings")
    page.fill("#seed", "7")  # a seed makes the reply repeatable, so regenerating it is a cache hit
    page.click("#toggle-settings")
    chat(page, "Hola")
    first = page.locator(".msg.assistant .body").inner_text()
    page.locator(".msg.assistant .regenerate").click()
    wait_reply_done(page)
    expect(page.locator(".msg.assistant")).to_have_count(1)  # replaced, not added
    assert page.locator(".msg.assistant .body").inner_text() == first
    copy = page.locator(".msg.user").get_by_role("button", name="Copy message")
    copy.click()
    expect(copy).to_have_text("Copied")


def test_error_states_say_what_happened(web, page):
    url, _ = web
    sign_in(page, url, "ana")
    completions = "**/v1/chat/completions"

    def answer(status, headers=None, code="x"):
        body = json.dumps(
            {"error": {"message": f"status {status}", "type": "t", "param": None, "code": code}}
        )
        page.route(completions, lambda r: r.fulfill(status=status, headers=headers or {}, body=body,
                                                    content_type="application/json"))  # fmt: skip

    answer(429, {"Retry-After": "2"}, "rate_limit_exceeded")
    send(page, "Hola")
    banner = page.locator("#banner")
    expect(banner).to_contain_text("wait 2 s")
    retry = banner.get_by_role("button", name=re.compile("Retry"))
    expect(retry).to_be_disabled()
    expect(retry).to_be_enabled(timeout=5000)  # after the countdown
    page.unroute(completions)
    retry.click()  # the same message goes again, now to the real server
    wait_reply_done(page)
    expect(banner).to_be_hidden()

    answer(503, {"Retry-After": "1"}, "queue_full")
    send(page, "Hola")
    expect(banner).to_contain_text("busy")
    page.unroute(completions)

    page.route(completions, lambda r: r.abort("connectionrefused"))
    send(page, "Hola")
    expect(banner).to_contain_text("cannot be reached")
    page.unroute(completions)

    answer(401, code="invalid_api_key")
    send(page, "Hola")
    expect(page.locator("#auth-username")).to_be_visible()  # back to sign in
    expect(page.locator("#app")).to_be_hidden()


# --- API keys ----------------------------------------------------------------------------------


def test_create_a_key_shown_once_and_revoke_it(web, page):
    url, _ = web
    sign_in(page, url, "ana")
    page.click("nav >> text=API keys")
    page.fill("#key-name", "notebook")
    page.fill("#key-days", "30")
    page.click("#create-key")
    key = page.locator("#secret-value").inner_text()
    assert key.startswith("sk-")
    row = page.locator("#keys tr", has_text="notebook")
    expect(row).to_contain_text(key[:8])
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    page.reload()
    expect(page.locator("#secret-value")).to_have_count(0)  # shown once
    assert key not in page.content()
    row.get_by_role("button", name="Revoke notebook").click()
    row.locator(".confirm-revoke").click()
    expect(row).to_contain_text("revoked")
    assert wait_until(lambda: httpx.get(url + "/v1/models", headers={"X-API-Key": key}).status_code == 401)


# --- dashboard ---------------------------------------------------------------------------------


def test_dashboard_as_admin_shows_populated_charts(web, page):
    url, _ = web
    sign_in(page, url, "ana", path="/admin")
    expect(page.locator("#dashboard")).to_be_visible()
    charts = page.locator("#charts figure")
    expect(charts).to_have_count(7)
    for title in (
        "Requests per minute",
        "Latency",
        "Status codes",
        "Generated tokens",
        "Queue depth",
        "Cache hit rate",
    ):
        expect(charts.filter(has_text=title).locator("svg path.line").first).to_be_attached()
    expect(charts.filter(has_text="Feedback").locator("svg rect.bar").first).to_be_attached()
    expect(page.locator("#totals")).to_contain_text("1 good / 0 bad")
    expect(page.locator("#models")).to_contain_text("tiny-chat")
    expect(page.locator("#models")).to_contain_text("4096 tokens")
    runs = page.locator("#runs tr[data-run]")
    expect(runs).to_have_count(1)
    expect(runs.first).to_contain_text("tiny-chat")
    expect(page.locator("#run-detail figure")).to_have_count(
        4
    )  # loss, perplexity, learning rate, gradient norm
    expect(
        page.locator("#run-detail figure").filter(has_text="Gradient norm").locator("svg path.line")
    ).to_be_attached()
    expect(page.locator("#run-detail svg path.line").first).to_be_attached()
    expect(page.locator("#users")).to_contain_text("ana")
    expect(page.locator("#all-keys")).to_contain_text("notebook")
    expect(page.locator("#feedback")).to_contain_text("buen comienzo")
    expect(page.locator("#learn")).to_contain_text("no learning loop has run yet")  # static/learn.js
    page.fill("#learn input[name=run]", "nope")  # the panel's form posts, and the refusal shows
    page.click("#learn button[type=submit]")
    expect(page.locator("#learn .banner")).to_contain_text("nope")
    page.click("#pause")
    expect(page.locator("#pause")).to_have_attribute("aria-pressed", "true")


def test_dashboard_is_forbidden_for_a_user(web, page):
    url, _ = web
    sign_in(page, url, "bob", register=True, path="/admin")
    expect(page.locator("#forbidden")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    expect(page.locator("nav")).not_to_contain_text("Dashboard")
    for path in ("/admin/stats", "/admin/users", "/admin/keys", "/admin/feedback", "/admin/learn"):
        assert page.request.get(url + path).status == 403, path


# --- XSS ---------------------------------------------------------------------------------------


def assert_inert(page, container: str) -> None:
    """The payloads show as text, and nothing in `container` is a script, image, frame or bad link."""
    box = page.locator(container)
    for tag in ("script", "img", "iframe", "object", "embed"):
        expect(box.locator(tag)).to_have_count(0)
    hrefs = box.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert all(h.startswith(("http://", "https://", "mailto:")) for h in hrefs), hrefs
    assert page.evaluate("() => window.__pwned === undefined")
    text = box.inner_text()
    assert "<script>alert('script')</script>" in text and "onerror=alert('img')" in text


def test_hostile_text_executes_nothing_and_loads_nothing(web, page):
    url, _ = web
    sign_in(page, url, "ana")
    hostile = HOSTILE + "\n\n<img src=x onerror=window.__pwned=1>"

    # 1. typed by the user and sent to the real model (the long-context one: the text is long)
    page.select_option("#model", "long")
    chat(page, hostile)
    assert_inert(page, ".msg.user")

    # 2. a stored conversation whose reply is hostile (the renderer that paints every reply)
    conv = page.request.post(url + "/v1/conversations", data={"title": "<img src=x onerror=alert(1)>", "messages": [
        {"role": "user", "content": "hola"}, {"role": "assistant", "content": hostile}]}).json()  # fmt: skip
    page.goto(f"{url}/#c={conv['id']}")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    assert_inert(page, ".msg.assistant")
    assert_inert(page, "#messages")
    expect(page.locator("#conversations")).to_contain_text("<img src=x onerror=alert(1)>")
    expect(page.locator("#conversations img")).to_have_count(0)

    # 3. a streamed reply carrying the payloads, split across chunks as tokens would be
    pieces = [hostile[i : i + 7] for i in range(0, len(hostile), 7)]
    events = [{"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions", lambda r: r.fulfill(status=200, body=body, content_type="text/event-stream")
    )
    page.click("#new-chat")
    chat(page, "hola")
    assert_inert(page, ".msg.assistant")
    page.unroute("**/v1/chat/completions")

    # 4. hostile feedback shown to the admin on the dashboard
    page.request.post(url + "/feedback", data={"rating": -1, "text": hostile, "conversation_id": conv["id"]})
    page.goto(url + "/admin")
    expect(page.locator("#feedback li").first).to_contain_text("onerror=window.__pwned=1")
    assert_inert(page, "#feedback")
    page.wait_for_timeout(300)  # time for anything that would fire late (onerror, a beacon)
    page.watch.assert_clean()


# --- documents: answers grounded in a collection -------------------------------------------------

NOTE = (
    "# Rocinante\n\nEl caballo de don Quijote se llamaba Rocinante: un rocín flaco que el hidalgo "
    "tuvo por mejor que Babieca.\n\n<img src=x onerror=window.__pwned=1> <script>alert('nota')</script>\n"
)
MINUTES = 120_000  # creating the first collection loads all-MiniLM-L6-v2; embedding runs on busy CPUs


def test_upload_a_document_ask_about_it_and_see_its_sources(web, page):
    url, _ = web
    sign_in(page, url, "ana")
    page.select_option("#model", "long")  # 4096 tokens of context: the passage fits the prompt
    page.click("#toggle-settings")
    page.fill("#max_tokens", "4")
    page.click("#toggle-settings")
    expect(page.locator("#add-files")).to_be_disabled()  # no collection picked yet

    page.click("#new-collection")
    page.fill("#collection-name", "mis notas")  # a space: the server's one-line refusal is shown
    page.press("#collection-name", "Enter")
    expect(page.locator("#rag-status")).to_contain_text("use 1-100 letters, digits", timeout=MINUTES)
    page.fill("#collection-name", "mis-notas")
    page.press("#collection-name", "Enter")
    expect(page.locator("#rag-status")).to_contain_text("Collection mis-notas created", timeout=MINUTES)
    expect(page.locator("#collection")).to_have_value("mis-notas")

    # one good file, and what the server refuses: binary, NUL bytes, over the body limit (4 MiB)
    page.set_input_files("#rag-files", files=[
        {"name": "rocinante.md", "mimeType": "text/markdown", "buffer": NOTE.encode()},
        {"name": "foto.txt", "mimeType": "text/plain", "buffer": bytes(range(128, 256))},
        {"name": "nul.txt", "mimeType": "text/plain", "buffer": b"hola\x00mundo"},
        {"name": "grande.txt", "mimeType": "text/plain", "buffer": b"a" * (5 * 1024 * 1024)},
    ])  # fmt: skip
    lines = page.locator("#rag-status li")
    expect(lines.nth(0)).to_have_text("rocinante.md: added to mis-notas (1 chunk)", timeout=MINUTES)
    expect(lines.nth(1)).to_have_text(re.compile(r"^foto\.txt: not UTF-8 text"), timeout=MINUTES)
    expect(lines.nth(2)).to_have_text(re.compile(r"^nul\.txt: a binary file"), timeout=MINUTES)
    expect(lines.nth(3)).to_have_text(re.compile(r"^grande\.txt: .*larger than"), timeout=MINUTES)
    expect(lines).to_have_count(4)
    expect(page.locator("#collection option:checked")).to_have_text("mis-notas · 1 document")

    # ask: the streamed answer lists the uploaded document as its source, as text
    chat(page, "¿Cómo se llamaba el caballo de don Quijote?")
    reply = page.locator(".msg.assistant").last
    sources = reply.locator(".source")
    expect(sources).to_have_count(1)
    expect(sources.first).to_have_attribute("data-document", "rocinante.md")
    expect(sources.first.locator(".source-head")).to_have_text(
        re.compile(r"^\[1\] rocinante\.md · chunk 0 · score")
    )
    expect(sources.first.locator(".source-snippet")).to_contain_text("se llamaba Rocinante")
    expect(sources.first.locator(".source-snippet")).to_contain_text("<img src=x onerror=window.__pwned=1>")
    for tag in ("img", "script"):
        expect(reply.locator(tag)).to_have_count(0)
    assert page.evaluate("() => window.__pwned === undefined")

    # the choice is kept across a reload; "no documents" asks the model alone
    page.reload()
    expect(page.locator(".msg.assistant")).to_have_count(1)  # the conversation, reopened
    expect(page.locator("#collection")).to_have_value("mis-notas")
    page.select_option("#collection", "")
    chat(page, "Hola")
    expect(page.locator(".msg.assistant").last.locator(".sources")).to_have_count(0)


# --- screenshots -------------------------------------------------------------------------------


def test_screenshots_of_chat_and_dashboard(web, browser, tmp_path):
    url, _ = web
    out = screenshot_dir(tmp_path)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport, device_scale_factor=1, color_scheme="light")
        page = context.new_page()
        watch = Watch(page)
        sign_in(page, url, "ana")
        page.select_option("#model", "tiny-chat")
        chat(page, "En un lugar de la Mancha")
        page.screenshot(path=str(out / f"chat-{name}.png"))
        page.goto(url + "/admin")
        expect(page.locator("#charts svg").first).to_be_visible()
        page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=name == "desktop")
        watch.assert_clean()
        context.close()
    for shot in ("chat-desktop", "chat-phone", "dashboard-desktop", "dashboard-phone"):
        assert (out / f"{shot}.png").stat().st_size > 10_000


def test_the_server_is_still_healthy(web):
    url, _ = web
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok"
    assert all(m["active"] == 0 and m["waiting"] == 0 for m in health["models"].values())
