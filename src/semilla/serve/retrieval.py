"""The server's side of retrieval: which embedding models it offers, its collections, and how
retrieval errors become HTTP errors.

Embedding models: all-MiniLM-L6-v2 and multilingual-e5-small (loaded on first use) and every
served transformer model, by its id. Collections live in the accounts database; their FAISS files under
<data_dir>/collections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from semilla.errors import SemillaError
from semilla.retrieval.embedders import PACKAGED, load_embedder, packaged_name
from semilla.serve.errors import APIError
from semilla.serve.hooks import Principal
from semilla.serve.settings import ServerSettings

T = TypeVar("T")


class ServerEmbedders:
    """Embedding models by the name a request gives: MiniLM, e5 or a served model's id."""

    def __init__(self, app: FastAPI):
        self.app = app

    def names(self) -> list[str]:
        return [*PACKAGED, *self.app.state.semilla.models]

    def known(self, name: str) -> bool:
        return packaged_name(name) is not None or name in self.app.state.semilla.models

    def __call__(self, name: str):
        """The embedder for `name`; a checkpoint path is accepted here only because collections
        created with `semilla index` may name one (requests are checked with `known` first)."""
        backend = self.app.state.semilla.local.get(name)
        if backend is None:
            return load_embedder(name)
        return backend.embedder()

    def check(self, name: str, param: str = "model") -> None:
        """404 naming the models offered, unless `name` is one of them."""
        if not self.known(name):
            offered = ", ".join(self.names())
            raise APIError(
                404, f"embedding model {name!r} does not exist (offered: {offered})", param=param,
                code="model_not_found",
            )  # fmt: skip

    def resolve(self, name: str):
        """The embedder a request names (404 for one not offered)."""
        self.check(name)
        return self(name)


def import_libraries() -> None:
    """Import sentence-transformers, FAISS and bm25s (several seconds, once per process) so the
    first retrieval request only waits for its model; nothing when the extra is not installed."""
    try:
        import bm25s  # noqa: F401
        import faiss  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        pass


def start_imports() -> threading.Thread:
    """`import_libraries` in a thread of its own, for the server to join before it serves: run
    while the models load, and over before the start-up objects are frozen out of the collector's
    sight. (Left to finish under load, the imports' ~300k objects stayed in its sight, and each
    full pass over them stalled every request for 0.1-0.4 s.)"""
    thread = threading.Thread(target=import_libraries, name="semilla-retrieval-imports", daemon=True)
    thread.start()
    return thread


def install(app: FastAPI, settings: ServerSettings) -> None:
    """Embedding models and collections on app.state (the accounts store must be installed)."""
    app.state.embedders = ServerEmbedders(app)
    app.state.collections_dir = Path(settings.data_dir) / "collections"
    app.state.collections = None  # made on first use: it imports FAISS and bm25s
    app.state.collections_lock = threading.Lock()


def collections(request: Request):
    """The server's Collections (created on first use)."""
    state = request.app.state
    with state.collections_lock:
        if state.collections is None:
            from semilla.retrieval.collections import Collections

            state.collections = Collections(
                state.accounts.store.engine, state.collections_dir, state.embedders
            )
        return state.collections


def viewer(principal: Principal):
    from semilla.retrieval.collections import Viewer

    return Viewer(principal.user_id, principal.role == "admin")


def as_api_error(e: SemillaError) -> APIError:
    """The one translation of retrieval errors to HTTP: 404 (also for another user's
    collection), 409, 403, else 400."""
    from semilla.retrieval.collections import Conflict, Forbidden, NotFound

    if isinstance(e, NotFound):
        return APIError(404, str(e), code="not_found")
    if isinstance(e, Conflict):
        return APIError(409, str(e), code="conflict")
    if isinstance(e, Forbidden):
        return APIError(403, str(e), code="forbidden")
    return APIError(400, str(e), code="invalid_value")


async def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn` in a worker thread (embedding and indexing are slow), its errors as HTTP errors."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except ImportError as e:
        raise APIError(
            501, f"retrieval is not installed on this server: pip install 'semilla[retrieval]' ({e.name})",
            type="server_error", code="not_installed",
        ) from e  # fmt: skip
    except SemillaError as e:
        raise as_api_error(e) from e


async def ground(
    request: Request, principal: Principal, options, messages: list[dict], fits: Callable[[list[dict]], bool]
) -> tuple[list[dict], list[dict]]:
    """(messages with the passages of `options.collection` in front, their sources) for a chat;
    the last passages are left out while the prompt does not `fit` the model."""
    from semilla.retrieval import rag

    books = collections(request)
    row = await run(books.get, options.collection, viewer(principal))
    question = rag.last_user_text(messages)
    if not question:
        raise APIError(400, "rag needs a user message to search for", param="messages")
    hits = await run(
        books.search, row, question, options.k, options.mode, fusion=options.fusion, expand=options.expand
    )
    while hits and not fits(rag.grounded_messages(messages, hits)):
        hits = hits[:-1]
    return rag.grounded_messages(messages, hits), rag.sources(hits)
