"""POST /v1/embeddings on a real server through the official `openai` client, and bad input."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from accounts_helpers import build_app, make_settings
from server_helpers import running_server

from semilla.retrieval.embedders import E5, MINILM, load_embedder

TEXTS = ["En un lugar de la Mancha", "Los molinos de viento eran gigantes."]


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("embeddings"))
    with running_server(build_app(settings, tiny_run)) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_openai_client_embeddings_equal_the_library(client: openai.OpenAI):
    expected = load_embedder(MINILM).embed(TEXTS)
    # no encoding_format: the client asks for base64 and decodes it itself
    for kw in ({}, {"encoding_format": "float"}):
        r = client.embeddings.create(model=MINILM, input=TEXTS, **kw)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert [d.index for d in r.data] == [0, 1] and r.model == MINILM
        assert np.abs(got - expected).max() < 1e-5
    raw = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="base64").data[1].embedding
    assert np.abs(np.frombuffer(base64.b64decode(raw), dtype="<f4") - expected[1]).max() < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(load_embedder(MINILM).count_tokens(TEXTS))
    one = client.embeddings.create(model=MINILM, input=TEXTS[0])
    assert np.abs(np.array(one.data[0].embedding) - expected[0]).max() < 1e-5
    same_dims = client.embeddings.create(model=MINILM, input=TEXTS[0], dimensions=384)
    assert len(same_dims.data[0].embedding) == 384


def test_token_ids_and_a_served_model(client: openai.OpenAI, tiny_run: Path):
    emb = load_embedder(MINILM)
    ids = emb.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    r = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    assert np.abs(np.array(r.data[0].embedding) - emb.embed(TEXTS[:1])[0]).max() < 1e-5
    short = ["Hola", "En un lugar"]  # the tiny model's context is 32 tokens
    tiny = client.embeddings.create(model="tiny", input=short, encoding_format="float")
    expected = load_embedder(str(tiny_run)).embed(short)
    assert np.abs(np.array([d.embedding for d in tiny.data]) - expected).max() < 1e-5


def test_multilingual_e5_gives_passage_vectors_and_refuses_token_ids(client: openai.OpenAI, server: str):
    r = client.embeddings.create(model=E5, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert r.model == E5 and np.abs(got - load_embedder(E5).embed(TEXTS)).max() < 1e-5
    ids = httpx.post(server + "/v1/embeddings", json={"model": E5, "input": [5, 6]}, timeout=60)
    assert ids.status_code == 400 and "not token ids" in ids.json()["error"]["message"]
    assert httpx.get(server + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["hola"] * 2049}, 400, "input"),
        ({"input": "palabra " * 400}, 400, "input"),  # > 256 tokens
        ({"input": ["hola", 3]}, 400, "input"),
        ({"input": ["hola", None]}, 400, "input"),
        ({"input": [[1, 2], "hola"]}, 400, "input"),
        ({"input": [10**9]}, 400, "input"),
        ({"input": ["hola", "a\ud800"]}, 400, "input"),  # a lone surrogate: valid JSON, not Unicode
        ({"input": "hola", "dimensions": 100}, 400, "dimensions"),
        ({"input": "hola", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hola", "model": "text-embedding-3-small"}, 404, "model"),
    ],
)
def test_bad_input_is_an_openai_error_and_the_server_stays_healthy(server: str, body, status, param):
    payload = json.dumps({"model": MINILM, **body})  # ASCII: a lone surrogate travels as \ud800
    r = httpx.post(
        server + "/v1/embeddings", content=payload, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param)
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    ok = httpx.post(server + "/v1/embeddings", json={"model": MINILM, "input": "hola"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384


def test_simpleia_encode_alias(server: str):
    r = httpx.post(server + "/embed/encode", json={"texts": TEXTS}, timeout=60)
    assert r.status_code == 200 and r.json()["dimension"] == 384
    assert np.abs(np.array(r.json()["embeddings"]) - load_embedder(MINILM).embed(TEXTS)).max() < 1e-5
