"""/v1/collections and simpleIA's /embed/* on a real server with accounts: the flow, owners,
bad input (right status, OpenAI's error shape, nothing lost, server healthy) and kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from accounts_helpers import build_app, free_port, login, make_settings, register
from server_helpers import running_server

from semilla.retrieval.collections import Collections, Viewer
from semilla.serve.accounts.db import make_engine

DOCS = [
    {"id": "molinos", "text": "Don Quijote atacó los molinos de viento creyendo que eran gigantes.",
     "metadata": {"parte": 1}},
    {"id": "insula", "text": "Sancho Panza gobernó la ínsula Barataria con buen juicio.", "metadata": {"parte": 2}},
]  # fmt: skip


@pytest.fixture(scope="module")
def site(tiny_run: Path, tmp_path_factory) -> Iterator[tuple[str, dict, dict]]:
    """(URL, admin headers, user headers): the first account registered is the admin."""
    settings = make_settings(tmp_path_factory.mktemp("collections"))
    with running_server(build_app(settings, tiny_run)) as url:
        c = httpx.Client(base_url=url, timeout=120)
        register(c, "root")
        register(c, "ana")
        yield url, login(c, "root"), login(c, "ana")


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_create_add_search_delete(site):
    url, _, ana = site
    c = httpx.Client(base_url=url, headers=ana, timeout=120)
    r = c.post("/v1/collections", json={"name": "libros"})
    assert r.status_code == 201 and r.json()["dim"] == 384 and r.json()["chunk_size"] == 1000
    assert_error(c.post("/v1/collections", json={"name": "libros"}), 409)
    r = c.post("/v1/collections/libros/documents", json={"documents": DOCS})
    assert r.json() == {"added": ["molinos", "insula"], "duplicates": [], "chunks": 2}
    files = [("file", ("dulcinea.txt", b"Dulcinea del Toboso, la dama del caballero.", "text/plain"))]
    r = c.post("/v1/collections/libros/files", files=files, data={"metadata": '{"parte": 1}'})
    assert r.status_code == 200 and r.json()["added"] == ["dulcinea.txt"], r.text
    hits = c.post("/v1/collections/libros/search", json={"query": "molinos gigantes", "k": 2}).json()["data"]
    assert hits[0]["document_id"] == "molinos" and hits[0]["metadata"] == {"parte": 1}
    body = {"query": "molinos gigantes", "k": 2, "fusion": "rrf"}
    assert c.post("/v1/collections/libros/search", json=body).json()["data"][0]["document_id"] == "molinos"
    # expanded, the query's two terms weigh half (not 2) and the hit's own terms the other half
    body = {"query": "molinos gigantes", "mode": "bm25"}
    plain = c.post("/v1/collections/libros/search", json=body).json()["data"]
    body = {"query": "molinos gigantes", "mode": "bm25", "expand": True}
    expanded = c.post("/v1/collections/libros/search", json=body).json()["data"]
    assert [h["document_id"] for h in plain] == [h["document_id"] for h in expanded] == ["molinos"]
    assert expanded[0]["score"] != pytest.approx(plain[0]["score"])
    hits = c.post("/v1/collections/libros/search", json={"query": "la dama", "filter": {"parte": 2}}).json()[
        "data"
    ]
    assert [h["document_id"] for h in hits] == ["insula"]
    assert [x["name"] for x in c.get("/v1/collections").json()["data"]] == ["libros"]
    assert c.delete("/v1/collections/libros/documents/molinos").json()["deleted"] is True
    assert c.get("/v1/collections/libros").json()["documents"] == 2
    assert c.delete("/v1/collections/libros").json()["deleted"] is True
    assert_error(c.get("/v1/collections/libros"), 404)


def test_another_users_collection_is_not_found_until_an_admin_shares_it(site):
    url, root, ana = site
    c = httpx.Client(base_url=url, timeout=120)
    assert c.post("/v1/collections", headers=root, json={"name": "privada"}).status_code == 201
    assert (
        c.post("/v1/collections/privada/documents", headers=root, json={"documents": DOCS[:1]}).status_code
        == 200
    )
    for method, path, body in [
        ("GET", "/v1/collections/privada", None),
        ("POST", "/v1/collections/privada/search", {"query": "molinos"}),
        ("POST", "/v1/collections/privada/documents", {"documents": DOCS[1:]}),
        ("DELETE", "/v1/collections/privada/documents/molinos", None),
        ("DELETE", "/v1/collections/privada", None),
    ]:
        error = assert_error(c.request(method, path, headers=ana, json=body), 404)
        assert "privada" in error["message"] and "does not exist" in error["message"]
    assert_error(c.patch("/v1/collections/privada", headers=ana, json={"shared": True}), 403)
    assert c.patch("/v1/collections/privada", headers=root, json={"shared": True}).json()["shared"] is True
    hits = c.post("/v1/collections/privada/search", headers=ana, json={"query": "molinos"}).json()["data"]
    assert hits[0]["document_id"] == "molinos"
    assert_error(c.post("/v1/collections/privada/documents", headers=ana, json={"documents": DOCS[1:]}), 403)
    assert c.get("/v1/collections/privada", headers=root).json()["documents"] == 1  # nothing lost


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status"),
    [
        ("unknown collection", dict(method="POST", url="/v1/collections/nada/search", json={"query": "x"}), 404),
        ("NUL bytes", dict(method="POST", url="/v1/collections/{c}/documents",
                           json={"documents": [{"text": "hola\u0000mundo"}]}), 400),
        ("binary file", dict(method="POST", url="/v1/collections/{c}/files",
                             files=[("file", ("x.bin", bytes(range(256)) * 4, "application/octet-stream"))]), 400),
        ("not UTF-8", dict(method="POST", url="/v1/collections/{c}/files",
                           files=[("file", ("latin1.txt", "año".encode("latin-1"), "text/plain"))]), 400),
        ("50 MB upload", dict(method="POST", url="/v1/collections/{c}/files",
                              files=[("file", ("big.txt", b"a" * (50 * 1024 * 1024), "text/plain"))]), 413),
        ("non-string text", dict(method="POST", url="/v1/collections/{c}/documents",
                                 json={"documents": [{"text": 42}]}), 400),
        ("lone surrogate", dict(method="POST", url="/v1/collections/{c}/documents",
                                content=json.dumps({"documents": [{"text": "hola \ud800"}]}),
                                headers={"Content-Type": "application/json"}), 400),
        ("empty query", dict(method="POST", url="/v1/collections/{c}/search", json={"query": " "}), 400),
        ("unknown fusion", dict(method="POST", url="/v1/collections/{c}/search",
                                json={"query": "x", "fusion": "max"}), 400),
        ("expand in dense mode", dict(method="POST", url="/v1/collections/{c}/search",
                                      json={"query": "x", "mode": "dense", "expand": True}), 400),
        ("non-boolean expand", dict(method="POST", url="/v1/collections/{c}/search",
                                    json={"query": "x", "expand": "yes"}), 400),
        ("bad filter", dict(method="POST", url="/v1/collections/{c}/search",
                            json={"query": "x", "filter": {"parte": {"$gt": 1}}}), 400),
        ("unknown embedder", dict(method="POST", url="/v1/collections",
                                  json={"name": "z", "embedding_model": "text-embedding-3-small"}), 404),
    ],
)  # fmt: skip
def test_bad_input_loses_nothing_and_the_server_stays_healthy(site, name, request_kwargs, status):
    url, _, ana = site
    c = httpx.Client(base_url=url, headers=ana, timeout=120)
    if c.get("/v1/collections/guarded").status_code == 404:
        c.post("/v1/collections", json={"name": "guarded"})
        c.post("/v1/collections/guarded/documents", json={"documents": DOCS})
    kwargs = dict(request_kwargs, url=request_kwargs["url"].format(c="guarded"))
    assert_error(c.request(**kwargs), status)
    assert c.get("/v1/collections/guarded").json()["documents"] == 2
    assert c.post("/v1/collections/guarded/search", json={"query": "molinos"}).json()["data"][0][
        "document_id"
    ]
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_simpleia_embed_routes(site):
    url, root, _ = site
    c = httpx.Client(base_url=url, headers=root, timeout=120)
    r = c.post("/embed/add", json={"documents": [d["text"] for d in DOCS]})
    assert r.status_code == 200 and r.json()["collection"] == "default" and len(r.json()["added"]) == 2
    results = c.post("/embed/search", json={"query": "ínsula Barataria", "k": 1}).json()["results"]
    assert "Barataria" in results[0]["text"]
    assert c.get("/embed/stats").json()["documents"] == 2


SERVER = """
import sys, uvicorn
from pathlib import Path
sys.path.insert(0, {tests!r})
from accounts_helpers import build_app, make_settings
uvicorn.run(build_app(make_settings(Path({tmp!r})), Path({run!r})), host="127.0.0.1", port={port}, log_level="error")
"""


@contextmanager
def server_process(tmp_path: Path, tiny_run: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """An open server in its own process (so it can be killed with -9); yields it and its URL."""
    port = free_port()
    code = SERVER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), run=str(tiny_run), port=port)
    proc = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # the subprocess imports torch and loads the model first
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proc, base
    finally:
        proc.kill()
        proc.wait()


def test_an_acknowledged_add_survives_kill_9(tmp_path: Path, tiny_run: Path):
    with server_process(tmp_path, tiny_run) as (proc, base):
        c = httpx.Client(base_url=base, timeout=120)
        assert c.post("/v1/collections", json={"name": "libros"}).status_code == 201
        r = c.post("/v1/collections/libros/documents", json={"documents": DOCS})
        assert r.status_code == 200
        os.kill(proc.pid, signal.SIGKILL)  # right after the answer: the index file may be behind
    db = sqlite3.connect(tmp_path / "data" / "semilla.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert {row[0] for row in db.execute("SELECT doc_id FROM collection_documents")} == {"molinos", "insula"}
    books = Collections(
        make_engine(f"sqlite:///{tmp_path / 'data' / 'semilla.db'}"), tmp_path / "data" / "collections"
    )
    row = books.get("libros", Viewer())
    assert books.search(row, "molinos de viento", mode="dense")[0].document_id == "molinos"
