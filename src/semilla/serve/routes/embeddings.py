"""OpenAI's POST /v1/embeddings, and simpleIA's POST /embed/encode.

input: a string, a list of strings, a list of token ids or a list of lists of token ids (of
the model's own tokenizer); encoding_format float | base64 (little-endian float32, as OpenAI);
`dimensions` only when it equals the model's. At most 2048 inputs, each within the model's
token limit; otherwise 400 in OpenAI's shape.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, StrictInt, StrictStr

from semilla.errors import SemillaError
from semilla.retrieval.embedders import MINILM, check_unicode
from semilla.serve import retrieval
from semilla.serve.errors import APIError
from semilla.serve.protocol import Body
from semilla.serve.routes.openai import JSON_BODY

router = APIRouter(tags=["embeddings"])
MAX_INPUTS = 2048


class EmbeddingRequest(Body):
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str = MINILM
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def as_inputs(raw) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists); 400 for an empty or oversized input."""
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if len(raw) > MAX_INPUTS:
        raise APIError(400, f"too many inputs: {len(raw)} (at most {MAX_INPUTS})", param="input")
    if isinstance(raw[0], int):
        return None, [list(raw)]
    if isinstance(raw[0], list):
        if any(not ids for ids in raw):
            raise APIError(400, "input token lists must not be empty", param="input")
        return None, [list(ids) for ids in raw]
    if any(not text for text in raw):
        raise APIError(400, "input strings must not be empty", param="input")
    return list(raw), None


def check_lengths(embedder, texts: list[str] | None, ids: list[list[int]] | None) -> list[int]:
    """Tokens per input; 400 naming the first input over the model's limit or a bad token id."""
    if texts is not None:
        try:
            check_unicode(texts)
        except SemillaError as e:
            raise APIError(400, str(e), param="input", code="invalid_value") from None
        counts = embedder.count_tokens(texts)
    else:
        vocab = embedder.vocab_size
        if any(not 0 <= t < vocab for seq in ids for t in seq):
            raise APIError(400, f"input token ids must be in [0, {vocab})", param="input")
        counts = embedder.count_ids(ids)
    for i, n in enumerate(counts):
        if n > embedder.max_tokens:
            raise APIError(
                400, f"input[{i}] has {n} tokens; {embedder.name} takes at most {embedder.max_tokens}",
                param="input", code="context_length_exceeded",
            )  # fmt: skip
    return counts


def render(vectors: np.ndarray, encoding: str) -> list[dict]:
    def one(v: np.ndarray):
        if encoding == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.astype(float).tolist()

    return [{"object": "embedding", "index": i, "embedding": one(v)} for i, v in enumerate(vectors)]


async def embed(request: Request, model: str, raw) -> tuple[object, np.ndarray, int]:
    """(embedder, vectors, prompt tokens) for an authorized request's input."""
    hooks = request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    texts, ids = as_inputs(raw)
    embedder = await retrieval.run(request.app.state.embedders.resolve, model)
    counts = await retrieval.run(check_lengths, embedder, texts, ids)
    vectors = await retrieval.run(embedder.embed if texts is not None else embedder.embed_ids, texts or ids)
    hooks.record_tokens(principal, sum(counts))
    return embedder, vectors, sum(counts)


@router.post("/v1/embeddings", dependencies=JSON_BODY)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    embedder, vectors, tokens = await embed(request, body.model, body.input)
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(
            400, f"{body.model} makes {embedder.dim}-dimensional vectors; dimensions={body.dimensions} is not supported",
            param="dimensions",
        )  # fmt: skip
    return {
        "object": "list",
        "data": render(vectors, body.encoding_format),
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class EncodeRequest(Body):
    texts: list[StrictStr]
    model: str = MINILM


@router.post("/embed/encode", dependencies=JSON_BODY)
async def encode(body: EncodeRequest, request: Request) -> dict:
    """simpleIA's encode: {"texts": [...]} -> {"embeddings": [[...]], "dimension": 384}."""
    embedder, vectors, _ = await embed(request, body.model, body.texts)
    return {"embeddings": vectors.astype(float).tolist(), "dimension": embedder.dim, "model": body.model}
