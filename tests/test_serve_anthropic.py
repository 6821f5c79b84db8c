"""POST /v1/messages through the official `anthropic` client on a real loopback server: the same
answers as the OpenAI chat route, Anthropic's stream events, stop reasons and error shape."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from accounts_helpers import build_app, login, make_settings, register
from server_helpers import running_server

SHORT = [{"role": "user", "content": "Hola"}]  # the tiny model's context is 32 tokens
# this client sends no sampling settings of its own any more: they travel in extra_body
GREEDY = dict(model="tiny", max_tokens=8, extra_body={"temperature": 0})


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory):
    with running_server(build_app(make_settings(tmp_path_factory.mktemp("anthropic")), tiny_run)) as url:
        yield url


@pytest.fixture
def client(server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)


def openai_chat(server: str, messages: list[dict], **kw):
    oa = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    return oa.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def test_create_equals_the_openai_chat_route(client: anthropic.Anthropic, server: str):
    r = client.messages.create(messages=SHORT, system="Breve.", **GREEDY)
    ref = openai_chat(server, [{"role": "system", "content": "Breve."}, *SHORT], max_tokens=8)
    assert r.type == "message" and r.role == "assistant" and r.model == "tiny" and r.id.startswith("msg-")
    assert [b.type for b in r.content] == ["text"]
    assert r.content[0].text == ref.choices[0].message.content and r.content[0].text
    assert r.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.usage.output_tokens == ref.usage.completion_tokens


def test_stream_events_and_text(client: anthropic.Anthropic):
    whole = client.messages.create(messages=SHORT, **GREEDY)
    with client.messages.stream(messages=SHORT, **GREEDY) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta", "text"} and "content_block_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    with client.messages.stream(messages=SHORT, **GREEDY) as stream:
        assert "".join(stream.text_stream) == whole.content[0].text


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic):
    text = client.messages.create(messages=SHORT, **GREEDY).content[0].text
    stop = text[2]  # a character the greedy answer writes after two others
    cut = client.messages.create(messages=SHORT, stop_sequences=[stop], **GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    one = client.messages.create(messages=SHORT, model="tiny", max_tokens=1, extra_body={"temperature": 0})
    assert one.stop_reason == "max_tokens" and one.usage.output_tokens == 1
    blocks = [{"type": "text", "text": "Ho"}, {"type": "text", "text": "la"}]
    parts = client.messages.create(messages=[{"role": "user", "content": blocks}], **GREEDY)
    assert parts.content[0].text == text  # text blocks are joined into the same prompt


def assert_anthropic_error(r: httpx.Response, status: int, kind: str, naming: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert naming in body["error"]["message"]


def test_bad_requests_get_anthropic_errors(client: anthropic.Anthropic, server: str):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(messages=SHORT, model="nope", max_tokens=4)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(messages=SHORT, model="tiny", max_tokens=4, extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    url = server + "/v1/messages"
    assert_anthropic_error(httpx.post(url, json={"model": "tiny", "messages": SHORT}), 400, "invalid_request_error",
                           "max_tokens")  # fmt: skip
    image = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": image}]}
    assert_anthropic_error(httpx.post(url, json=body), 400, "invalid_request_error", "'image'")
    assert_anthropic_error(
        httpx.post(url, content=b"hola", headers={"content-type": "text/plain"}), 415, "invalid_request_error",
        "application/json",
    )  # fmt: skip
    assert_anthropic_error(httpx.post(url, content=b"{", headers={"content-type": "application/json"}), 400,
                           "invalid_request_error", "not valid JSON")  # fmt: skip
    assert_anthropic_error(httpx.post(url, json={**body, "model": "nope"}), 404, "not_found_error", "nope")
    # errors raised before any route (no such route, wrong method) have the same shape
    assert_anthropic_error(httpx.post(url + "/count_tokens", json=body), 404, "not_found_error", "no route")
    assert_anthropic_error(httpx.get(url), 405, "invalid_request_error", "method not allowed")


def test_x_api_key_authenticates(tiny_run: Path, tmp_path: Path):
    with running_server(build_app(make_settings(tmp_path), tiny_run)) as url:
        with httpx.Client(base_url=url) as http:
            register(http, "ana")
            key = http.post("/v1/keys", headers=login(http, "ana"), json={"name": "claude"}).json()["key"]
        r = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0).messages.create(
            messages=SHORT, **GREEDY
        )
        assert r.content[0].text
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0).messages.create(
                messages=SHORT, **GREEDY
            )
        assert e.value.body["error"]["type"] == "authentication_error"
