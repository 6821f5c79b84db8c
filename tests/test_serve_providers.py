"""Providers: remote OpenAI/Anthropic-compatible services and routes, each a real server on
loopback (upstreams of our own that fail as told), and the providers file's checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
from accounts_helpers import make_settings
from helpers import run_cli
from provider_helpers import (
    ANSWER,
    anthropic_app,
    delta,
    metric,
    provider_metrics,
    upstream_app,
    write_providers,
)
from server_helpers import free_port, running_server

from semilla.serve.app import create_app
from semilla.serve.backends.chain import Breaker
from semilla.serve.providers import CooldownPolicy, ProvidersFileError, load_providers
from semilla.serve.registry import load_models

KEY = "sk-test-0123456789abcdef"
HOLA = [{"role": "user", "content": "Hola"}]


@pytest.fixture(scope="module")
def healthy(tiny_run: Path, tmp_path_factory) -> str:
    """A semilla server with the tiny model: the provider that always answers."""
    app = create_app(
        make_settings(tmp_path_factory.mktemp("healthy")), load_models([("tiny", str(tiny_run))])
    )
    with running_server(app) as url:
        yield url


def front(tmp_path: Path, providers: str, **settings):
    """A semilla server whose models are the providers file's (no checkpoint of its own)."""
    path = write_providers(tmp_path / "providers.yaml", providers)
    return create_app(make_settings(tmp_path, providers=path, **settings), {})


def ask(url: str, model: str, stream: bool = False, **body) -> httpx.Response:
    payload = {"model": model, "messages": HOLA, "max_tokens": 3, "temperature": 0, "stream": stream, **body}
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=30)


def events(response: httpx.Response) -> list:
    """The data of each SSE event: parsed JSON, or '[DONE]'."""
    out = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- the providers file --------------------------------------------------------------------


def test_an_unknown_kind_is_a_startup_error_naming_its_line(tmp_path: Path):
    path = write_providers(
        tmp_path / "providers.yaml", "providers:\n  up:\n    kind: openai\n  odd:\n    kind: gemini\n"
    )
    with pytest.raises(ProvidersFileError, match=r"providers.yaml:5: provider 'odd': unknown kind 'gemini'"):
        load_providers(path)
    r = run_cli("serve", "--providers", path, "--data-dir", tmp_path / "data", "--port", free_port())
    assert r.returncode == 2
    assert (
        "providers.yaml:5: provider 'odd': unknown kind 'gemini'" in r.stderr and "Traceback" not in r.stderr
    )


def test_a_missing_key_variable_is_a_startup_error_naming_its_line(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SEMILLA_TEST_NO_SUCH_KEY", raising=False)
    path = write_providers(
        tmp_path / "providers.yaml",
        "providers:\n  deepseek:\n    kind: openai\n    base_url: https://api.deepseek.com/v1\n"
        "    api_key_env: SEMILLA_TEST_NO_SUCH_KEY\n",
    )
    with pytest.raises(ProvidersFileError, match=r"providers.yaml:5: provider 'deepseek': the environment variable "
                       r"SEMILLA_TEST_NO_SUCH_KEY is not set"):  # fmt: skip
        load_providers(path)


def test_every_problem_of_a_file_is_named_with_its_line(tmp_path: Path):
    path = write_providers(
        tmp_path / "providers.yaml",
        "providers:\n"
        "  up: {kind: openai, api_key: sk-inline}\n"  # 2: a key written in the file
        "  far: {kind: openai, base_url: 'file:///etc/passwd'}\n"  # 3: not http(s)
        "routes:\n"
        "  chain: up -> nowhere -> templates\n",  # 5: an unknown link, templates off, 'up' has no model
    )
    with pytest.raises(ProvidersFileError) as e:
        load_providers(path)
    message = str(e.value)
    assert "providers.yaml:2: provider 'up': keys are never written in this file" in message
    assert "providers.yaml:3: provider 'far': base_url must be an http(s) URL" in message
    assert "providers.yaml:5: 'nowhere' is no model or provider" in message
    assert "providers.yaml:5: templates is off" in message
    assert "providers.yaml:5: provider 'up' has no default model" in message


def test_a_provider_cools_down_after_three_failures_and_honours_retry_after():
    now = [0.0]
    breaker = Breaker(CooldownPolicy(allowed_fails=3, cooldown_s=5, window_s=60), clock=lambda: now[0])
    breaker.failed()
    breaker.failed()
    assert breaker.available
    breaker.failed()
    assert not breaker.available  # three failures: five seconds off
    now[0] = 5.0
    assert breaker.available
    breaker.failed(retry_after=30)  # the provider asked for 30 s
    now[0] = 34.0
    assert not breaker.available
    now[0] = 35.0
    assert breaker.available


# --- what a remote provider may do wrong ---------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "says"),
    [("html", 502, "answered an HTML page"), ("invalid_json", 502, "answered invalid JSON"),
     ("500", 502, "answered 500"), ("hang", 504, "no answer within 0.5 s")],
)  # fmt: skip
def test_a_bad_upstream_is_an_openai_shaped_provider_error(tmp_path: Path, mode: str, status: int, says: str):
    upstream = upstream_app(lambda n: mode)
    with running_server(upstream) as up:
        app = front(
            tmp_path, f"providers:\n  up: {{kind: openai, base_url: '{up}/v1', model: m, timeout_s: 0.5}}\n"
        )
        with running_server(app) as url:
            r = ask(url, "up")
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["type"] == "provider_error" and says in error["message"]
            assert httpx.get(url + "/health").status_code == 200  # the server is fine


def test_a_401_is_not_retried_and_is_reported_without_the_key(
    tmp_path: Path, healthy: str, monkeypatch, caplog
):
    monkeypatch.setenv("SEMILLA_TEST_KEY", KEY)
    upstream = upstream_app(lambda n: "401")
    caplog.set_level(logging.DEBUG)
    with running_server(upstream) as up:
        app = front(
            tmp_path,
            f"providers:\n"
            f"  up: {{kind: openai, base_url: '{up}/v1', model: m, api_key_env: SEMILLA_TEST_KEY}}\n"
            f"  healthy: {{kind: openai, base_url: '{healthy}/v1', model: tiny}}\n"
            f"routes:\n  chain: up -> healthy\n",
        )
        with running_server(app) as url:
            before = provider_metrics("healthy")
            r = ask(url, "chain")
            assert r.status_code == 502
            error = r.json()["error"]
            assert error["type"] == "provider_error" and "refused the request (401)" in error["message"]
            assert KEY not in r.text and "***" in error["message"]
            assert upstream.state.calls == 1  # not retried
            assert delta(provider_metrics("healthy"), before)["calls"] == 0  # and nobody else asked
            assert upstream.state.seen[0][0]["authorization"] == f"Bearer {KEY}"  # the key did go upstream
            models = httpx.get(url + "/v1/models").text
            assert KEY not in models and up not in models  # neither key nor URL is shown
    assert KEY not in caplog.text


def test_a_truncated_stream_after_the_first_token_ends_with_an_error_event(tmp_path: Path, healthy: str):
    upstream = upstream_app(lambda n: "truncated")
    with running_server(upstream) as up:
        app = front(
            tmp_path,
            f"providers:\n  up: {{kind: openai, base_url: '{up}/v1', model: m}}\n"
            f"  healthy: {{kind: openai, base_url: '{healthy}/v1', model: tiny}}\n"
            f"routes:\n  chain: up -> healthy\n",
        )
        with running_server(app) as url:
            before = provider_metrics("healthy")
            r = ask(url, "chain", stream=True)
            assert r.status_code == 200
            got = events(r)
            assert got[0]["choices"][0]["delta"]["content"] == "hola"  # the first token reached us
            assert "ended before it was complete" in got[-2]["error"]["message"]
            assert got[-1] == "[DONE]"
            assert delta(provider_metrics("healthy"), before)["calls"] == 0  # too late to fall back


def test_a_stream_falls_back_before_its_first_token(tmp_path: Path, healthy: str):
    upstream = upstream_app(lambda n: ["500", "empty_stream"][n])
    with running_server(upstream) as up:
        app = front(
            tmp_path,
            f"providers:\n  up: {{kind: openai, base_url: '{up}/v1', model: m}}\n"
            f"  healthy: {{kind: openai, base_url: '{healthy}/v1', model: tiny}}\n"
            f"routes:\n  chain: up -> healthy\n",
        )
        client = None
        with running_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for _ in range(2):  # a 500, then a stream that ends before any token: both fall back
                with client.chat.completions.with_streaming_response.create(
                    model="chain", messages=HOLA, max_tokens=3, temperature=0, stream=True
                ) as response:
                    assert response.headers["x-semilla-provider"] == "healthy"
                    chunks = list(response.parse())
                assert chunks[0].model == "healthy/tiny"
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            assert upstream.state.calls == 2


def test_templates_answer_last_marked_and_counted(tmp_path: Path):
    dead = free_port()
    app = front(
        tmp_path,
        f"providers:\n  dead: {{kind: openai, base_url: 'http://127.0.0.1:{dead}/v1', model: m}}\n"
        f"routes:\n  chain: dead -> templates\n"
        f"templates: {{enabled: true, answer: 'Vuelva luego.'}}\n",
    )
    with running_server(app) as url:
        before = metric("semilla_template_answers_total")
        r = ask(url, "chain")
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Vuelva luego."
        assert body["system_fingerprint"] == "semilla-templates"
        assert r.headers["x-semilla-fallback"] == "templates"
        assert metric("semilla_template_answers_total") == before + 1


def test_an_anthropic_provider_answers_through_the_openai_api(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SEMILLA_TEST_ANTHROPIC_KEY", KEY)
    upstream = anthropic_app()
    with running_server(upstream) as up:
        app = front(
            tmp_path,
            f"providers:\n  claude: {{kind: anthropic, base_url: '{up}', api_key_env: SEMILLA_TEST_ANTHROPIC_KEY,"
            f" models: [claude-test]}}\n",
        )
        with running_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            assert "claude/claude-test" in [m.id for m in client.models.list()]
            messages = [{"role": "system", "content": "Sé breve."}, *HOLA]
            r = client.chat.completions.create(model="claude/claude-test", messages=messages, max_tokens=4)
            assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "length"
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 4)
            stream = client.chat.completions.create(model="claude/claude-test", messages=HOLA, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER
            headers, body = upstream.state.seen[0]
            assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
            assert body["system"] == "Sé breve." and body["messages"] == HOLA and body["max_tokens"] == 4
