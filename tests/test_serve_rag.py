"""RAG in chat: `"rag": {"collection", "k"}` puts the passages into the prompt with source
markers and the response (and a stream's first chunk) lists the sources."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from server_helpers import running_server

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.retrieval import rag
from semilla.retrieval.collections import SearchHit
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

DOCS = [
    {"id": "molinos", "text": "Don Quijote atacó los molinos de viento creyendo que eran gigantes."},
    {"id": "insula", "text": "Sancho Panza gobernó la ínsula Barataria con buen juicio."},
]
QUESTION = [{"role": "user", "content": "¿Qué creyó don Quijote de los molinos de viento?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_text: str):
    """An open server with an untrained char model of 2048 tokens of context, and one collection."""
    torch.manual_seed(0)
    tok = Tokenizer.train_char([corpus_text + "".join(d["text"] for d in DOCS) + "¿[]#"])
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=32)
    )
    path = save_checkpoint(tmp_path_factory.mktemp("rag") / "long", model, tok)
    settings = ServerSettings(_env_file=None, data_dir=str(tmp_path_factory.mktemp("data")))
    with running_server(create_app(settings, load_models([("long", str(path))]))) as url:
        c = httpx.Client(base_url=url, timeout=120)
        assert c.post("/v1/collections", json={"name": "libros"}).status_code == 201
        assert c.post("/v1/collections/libros/documents", json={"documents": DOCS}).status_code == 200
        yield url, path


def test_grounded_messages_mark_each_source():
    hits = [SearchHit("molinos", 0, 0.5, "texto uno", {}), SearchHit("insula", 2, 0.4, "texto dos", {})]
    grounded = rag.grounded_messages(QUESTION, hits)
    assert grounded[0]["role"] == "system" and grounded[1:] == QUESTION
    assert "[1] (molinos #0) texto uno" in grounded[0]["content"]
    assert "[2] (insula #2) texto dos" in grounded[0]["content"]
    assert [s["id"] for s in rag.sources(hits)] == [1, 2]


def test_chat_answers_from_a_collection_with_sources(server):
    url, path = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="long", messages=QUESTION, max_tokens=4, temperature=0)
    plain = client.chat.completions.create(**kw)
    r = client.chat.completions.create(**kw, extra_body={"rag": {"collection": "libros", "k": 2}})
    sources = r.model_extra["sources"]
    assert [s["document_id"] for s in sources] == ["molinos", "insula"]
    assert sources[0]["snippet"].startswith("Don Quijote atacó") and sources[0]["id"] == 1
    # the prompt the model saw: the question behind the two marked passages, through the chat template
    tok = Tokenizer.load(path)
    hits = [
        SearchHit(s["document_id"], s["chunk"], s["score"], d["text"], {})
        for s, d in zip(sources, DOCS, strict=True)
    ]
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(rag.grounded_messages(QUESTION, hits)))
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens


def test_a_stream_carries_the_sources_in_its_first_chunk(server):
    url, _ = server
    body = {
        "model": "long",
        "messages": QUESTION,
        "max_tokens": 3,
        "stream": True,
        "rag": {"collection": "libros", "k": 1},
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    first = json.loads(lines[0])
    assert [s["document_id"] for s in first["sources"]] == ["molinos"]
    assert all("sources" not in json.loads(line) for line in lines[1:-1]) and lines[-1] == "[DONE]"


def test_the_search_options_reach_the_search(server):
    url, _ = server
    body = {"model": "long", "messages": QUESTION, "max_tokens": 1}
    rag = {"collection": "libros", "k": 1, "mode": "bm25"}
    plain, expanded = (
        httpx.post(url + "/v1/chat/completions", json=dict(body, rag=dict(rag, expand=e)), timeout=120).json()
        for e in (False, True)
    )
    assert [s["document_id"] for s in plain["sources"]] == [s["document_id"] for s in expanded["sources"]]
    assert expanded["sources"][0]["score"] != pytest.approx(plain["sources"][0]["score"])
    r = httpx.post(
        url + "/v1/chat/completions", json=dict(body, rag=dict(rag, mode="dense", expand=True)), timeout=60
    )
    assert r.status_code == 400 and "expand" in r.json()["error"]["message"]


def test_an_unknown_collection_is_a_404(server):
    url, _ = server
    body = {"model": "long", "messages": QUESTION, "max_tokens": 2, "rag": {"collection": "nada"}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 404 and "nada" in r.json()["error"]["message"]
