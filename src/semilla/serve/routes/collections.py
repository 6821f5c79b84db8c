"""Document collections over HTTP: /v1/collections/... and simpleIA's /embed/add|search|stats.

POST   /v1/collections                          {"name", "embedding_model"?, "chunk_size"?, "chunk_overlap"?}
GET    /v1/collections                          the caller's, shared ones (an admin: all)
GET    /v1/collections/{name}
PATCH  /v1/collections/{name}                   {"shared": true}  (admin)
DELETE /v1/collections/{name}
POST   /v1/collections/{name}/documents         {"documents": [{"text", "id"?, "metadata"?}]}
POST   /v1/collections/{name}/files             multipart: one or more `file`, optional `metadata` (JSON)
DELETE /v1/collections/{name}/documents/{id}
POST   /v1/collections/{name}/search            {"query", "k"?, "mode"?, "fusion"?, "expand"?, "filter"?}

Another user's private collection answers 404, as one that does not exist.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import ConfigDict, Field, StrictBool, StrictStr

from semilla.retrieval.embedders import MINILM
from semilla.retrieval.fusion import FUSIONS
from semilla.serve import retrieval
from semilla.serve.errors import APIError
from semilla.serve.protocol import Body
from semilla.serve.routes.openai import JSON_BODY

router = APIRouter(tags=["collections"])
DEFAULT_COLLECTION = "default"  # the one simpleIA's /embed/* routes use when none is named
MAX_DOCUMENTS = 256  # per request: each is chunked and embedded before the answer


class CreateCollection(Body):
    model_config = ConfigDict(extra="forbid")
    name: str
    embedding_model: str = MINILM
    chunk_size: int = Field(1000, ge=1, le=100_000)
    chunk_overlap: int = Field(100, ge=0)


class DocumentIn(Body):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    id: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, str | int | float | bool] = {}


class AddDocuments(Body):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS)


class SearchRequest(Body):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr
    k: int = Field(4, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    fusion: Literal["relative_score", "rrf"] = FUSIONS[0]  # how hybrid fuses BM25 and dense
    expand: StrictBool = False  # BM25 again with the first answer's best terms (bm25, hybrid)
    filter: dict[str, str | int | float | bool | list[str | int | float | bool]] | None = None


class ShareRequest(Body):
    shared: bool


async def who(request: Request):
    principal = await request.app.state.hooks.authorize(request, "models")
    return retrieval.collections(request), retrieval.viewer(principal), principal


def hit_dict(hit) -> dict[str, Any]:
    return {"document_id": hit.document_id, "chunk": hit.chunk, "score": hit.score, "text": hit.text,
            "metadata": hit.metadata}  # fmt: skip


def added_dict(result) -> dict[str, Any]:
    return {"added": result.added, "duplicates": result.duplicates, "chunks": result.chunks}


# --- collections -----------------------------------------------------------------------------


@router.post("/v1/collections", dependencies=JSON_BODY, status_code=201)
async def create_collection(body: CreateCollection, request: Request) -> dict:
    from semilla.retrieval.chunking import ChunkConfig

    books, viewer, _ = await who(request)
    request.app.state.embedders.check(body.embedding_model, param="embedding_model")
    chunking = ChunkConfig(body.chunk_size, body.chunk_overlap)
    row = await retrieval.run(books.create, body.name, viewer, body.embedding_model, chunking)
    return (await retrieval.run(books.info, row)).as_dict()


@router.get("/v1/collections")
async def list_collections(request: Request) -> dict:
    books, viewer, _ = await who(request)
    return {"object": "list", "data": [c.as_dict() for c in await retrieval.run(books.list, viewer)]}


@router.get("/v1/collections/{name}")
async def get_collection(name: str, request: Request) -> dict:
    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer)
    return (await retrieval.run(books.info, row)).as_dict()


@router.patch("/v1/collections/{name}", dependencies=JSON_BODY)
async def share_collection(name: str, body: ShareRequest, request: Request) -> dict:
    books, viewer, principal = await who(request)
    if principal.role != "admin":
        raise APIError(403, "only an admin can share a collection", code="forbidden")
    row = await retrieval.run(books.get, name, viewer, write=True)
    await retrieval.run(books.share, row, body.shared)
    row.shared = body.shared
    return (await retrieval.run(books.info, row)).as_dict()


@router.delete("/v1/collections/{name}")
async def delete_collection(name: str, request: Request) -> dict:
    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer, write=True)
    await retrieval.run(books.drop, row)
    return {"id": name, "object": "collection.deleted", "deleted": True}


# --- documents -------------------------------------------------------------------------------


@router.post("/v1/collections/{name}/documents", dependencies=JSON_BODY)
async def add_documents(name: str, body: AddDocuments, request: Request) -> dict:
    from semilla.retrieval.collections import NewDocument

    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer, write=True)
    docs = [NewDocument(d.text, d.id, dict(d.metadata)) for d in body.documents]
    return added_dict(await retrieval.run(books.add, row, docs))


@router.post("/v1/collections/{name}/files")
async def add_files(
    name: str,
    request: Request,
    file: Annotated[list[UploadFile], File(description="UTF-8 text files")],
    metadata: Annotated[str, Form(description="a JSON object given to every file's document")] = "{}",
) -> dict:
    """Each file becomes one document, its id the file name, its metadata {"source": name, ...}."""
    from semilla.retrieval.collections import NewDocument
    from semilla.retrieval.files import file_text

    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer, write=True)
    try:
        extra = json.loads(metadata)
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        raise APIError(400, "metadata must be a JSON object", param="metadata")
    docs = []
    for upload in file:
        filename = upload.filename or "upload"
        text = await retrieval.run(file_text, filename, await upload.read())
        docs.append(NewDocument(text, filename, {"source": filename, **extra}))
    return added_dict(await retrieval.run(books.add, row, docs))


@router.delete("/v1/collections/{name}/documents/{doc_id:path}")
async def delete_document(name: str, doc_id: str, request: Request) -> dict:
    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer, write=True)
    await retrieval.run(books.delete_document, row, doc_id)
    return {"id": doc_id, "object": "document.deleted", "deleted": True}


@router.post("/v1/collections/{name}/search", dependencies=JSON_BODY)
async def search(name: str, body: SearchRequest, request: Request) -> dict:
    books, viewer, _ = await who(request)
    row = await retrieval.run(books.get, name, viewer)
    hits = await retrieval.run(
        books.search, row, body.query, body.k, body.mode, body.filter, body.fusion, body.expand
    )
    return {"object": "list", "data": [hit_dict(h) for h in hits]}


# --- simpleIA's /embed/* -----------------------------------------------------------------------


class EmbedAdd(Body):
    documents: list[StrictStr] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    collection: str = DEFAULT_COLLECTION


class EmbedSearch(Body):
    query: StrictStr
    k: int = Field(5, ge=1, le=100)
    collection: str = DEFAULT_COLLECTION


async def default_collection(request: Request, name: str, create: bool):
    from semilla.retrieval.collections import NotFound

    books, viewer, _ = await who(request)
    try:
        return books, await retrieval.run(books.get, name, viewer, write=create)
    except APIError as e:
        if not (create and name == DEFAULT_COLLECTION and isinstance(e.__cause__, NotFound)):
            raise
    return books, await retrieval.run(books.create, name, viewer)


@router.post("/embed/add", dependencies=JSON_BODY)
async def embed_add(body: EmbedAdd, request: Request) -> dict:
    """simpleIA's add: {"documents": ["...", ...]} into the caller's `default` collection."""
    from semilla.retrieval.collections import NewDocument

    books, row = await default_collection(request, body.collection, create=True)
    result = await retrieval.run(books.add, row, [NewDocument(t) for t in body.documents])
    return {"collection": row.name, **added_dict(result)}


@router.post("/embed/search", dependencies=JSON_BODY)
async def embed_search(body: EmbedSearch, request: Request) -> dict:
    books, row = await default_collection(request, body.collection, create=False)
    hits = await retrieval.run(books.search, row, body.query, body.k)
    return {"query": body.query, "results": [hit_dict(h) for h in hits]}


@router.get("/embed/stats")
async def embed_stats(request: Request, collection: str = DEFAULT_COLLECTION) -> dict:
    books, row = await default_collection(request, collection, create=False)
    return (await retrieval.run(books.info, row)).as_dict()
