"""Ollama's native API through the official `ollama` client on a real loopback server: the same
answers as the OpenAI routes, NDJSON streams, model listing, embeddings and Ollama's errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
from accounts_helpers import build_app, make_settings
from server_helpers import running_server

from semilla import __version__
from semilla.retrieval.embedders import load_embedder

SHORT = [{"role": "user", "content": "Hola"}]  # the tiny model's context is 32 tokens
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory):
    with running_server(build_app(make_settings(tmp_path_factory.mktemp("ollama")), tiny_run)) as url:
        yield url


@pytest.fixture
def client(server: str) -> ollama.Client:
    return ollama.Client(host=server)


@pytest.fixture
def oa(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_chat_equals_the_openai_chat_route(client: ollama.Client, oa: openai.OpenAI):
    ref = oa.chat.completions.create(model="tiny", messages=SHORT, max_tokens=8, temperature=0)
    r = client.chat(model="tiny", messages=SHORT, options=GREEDY, stream=False)
    assert r.message.role == "assistant" and r.message.content == ref.choices[0].message.content
    assert r.done and r.done_reason == ref.choices[0].finish_reason and r.model == "tiny"
    assert r.prompt_eval_count == ref.usage.prompt_tokens and r.eval_count == ref.usage.completion_tokens
    chunks = list(client.chat(model="tiny", messages=SHORT, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and chunks[-1].message.content == ""
    assert "".join(c.message.content for c in chunks) == r.message.content
    assert chunks[-1].eval_count == r.eval_count


def test_stream_is_ndjson_by_default(server: str):
    body = {"model": "tiny", "messages": SHORT, "options": GREEDY}
    with httpx.stream("POST", server + "/api/chat", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) > 1 and lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length")


def test_generate_templated_and_raw(client: ollama.Client, oa: openai.OpenAI):
    chat_ref = oa.chat.completions.create(model="tiny", messages=SHORT, max_tokens=8, temperature=0)
    r = client.generate(model="tiny", prompt="Hola", options=GREEDY)
    assert r.response == chat_ref.choices[0].message.content and r.done
    raw_ref = oa.completions.create(model="tiny", prompt="En un", max_tokens=8, temperature=0)
    raw = client.generate(model="tiny", prompt="En un", raw=True, options=GREEDY)
    assert raw.response == raw_ref.choices[0].text and raw.eval_count == raw_ref.usage.completion_tokens
    streamed = "".join(c.response for c in client.generate(model="tiny", prompt="En un", raw=True, options=GREEDY,
                                                         stream=True))  # fmt: skip
    assert streamed == raw.response
    stopped = client.generate(
        model="tiny", prompt="En un", raw=True, options={**GREEDY, "stop": [raw.response[1]]}
    )
    assert stopped.response == raw.response[: raw.response.index(raw.response[1])]
    loaded = client.generate(model="tiny")  # no prompt: Ollama's "load the model"
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_list_show_version(client: ollama.Client, server: str):
    assert [m.model for m in client.list().models] == ["tiny"]
    shown = client.show("tiny")
    assert 32 in shown.modelinfo.values()  # the tiny model's context length
    assert httpx.get(server + "/api/version").json() == {"version": __version__}


def test_embed_equals_the_library(client: ollama.Client, tiny_run: Path):
    texts = ["Hola", "En un lugar"]
    r = client.embed(model="tiny", input=texts)
    expected = load_embedder(str(tiny_run)).embed(texts)
    assert np.abs(np.array(r.embeddings) - expected).max() < 1e-5
    one = client.embed(model="tiny", input="Hola")
    assert np.abs(np.array(one.embeddings[0]) - expected[0]).max() < 1e-5


def test_bad_requests_get_ollama_errors(client: ollama.Client, server: str):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=SHORT, stream=False)
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=SHORT, format={"type": "strin"}, stream=False)
    assert e.value.status_code == 400 and "format is not a valid JSON Schema" in e.value.error
    for path, body, status, naming in [
        ("/api/chat", {"messages": SHORT}, 400, "model"),
        ("/api/chat", {"model": "tiny", "messages": SHORT, "options": {"temperature": "hot"}}, 400, "temperature"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["AA=="]}]}, 400,
         "images"),
        ("/api/generate", {"model": "tiny", "prompt": "Hola", "options": {"num_predict": 500}}, 400, "num_predict"),
        ("/api/embed", {"model": "nope", "input": "Hola"}, 404, "nope"),
    ]:  # fmt: skip
        r = httpx.post(server + path, json=body)
        assert r.status_code == status and naming in r.json()["error"], (path, r.text)
    r = httpx.post(server + "/api/chat", content=b"hola", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and isinstance(r.json()["error"], str)
    r = httpx.post(server + "/api/pull", json={"model": "tiny"})  # no such route here
    assert r.status_code == 404 and r.json() == {"error": "no route POST /api/pull"}
