"""Small upstream servers of our own, on loopback, that answer like OpenAI's or Anthropic's API
(or fail as told), and a providers file pointing at them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY

from semilla.serve.settings import ServerSettings

ANSWER = "hola desde arriba"


def openai_answer(body: dict) -> dict:
    n = body.get("n", 1)
    return {
        "id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": i, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
                    for i in range(n)],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }  # fmt: skip


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def openai_chunks(body: dict, words: list[str], finish: bool = True) -> list[str]:
    head = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
    chunks = [sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    chunks += [
        sse({**head, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
        for w in words
    ]
    if finish:
        chunks.append(sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        chunks.append(sse({**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}))
        chunks.append("data: [DONE]\n\n")
    return chunks


def upstream_app(behaviour: Callable[[int], str]) -> FastAPI:
    """An OpenAI-compatible /v1/chat/completions whose n-th request (from 0) does
    `behaviour(n)`: ok, 500, 429, 401, html, invalid_json, hang, truncated (a stream that stops
    after one word), empty_stream (one that ends before any word)."""
    app = FastAPI()
    app.state.settings = ServerSettings(_env_file=None)
    app.state.calls = 0
    app.state.seen = []  # (headers, body) of each request

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n, app.state.calls = app.state.calls, app.state.calls + 1
        app.state.seen.append((dict(request.headers), body))
        mode = behaviour(n)
        if mode == "500":
            return JSONResponse({"error": {"message": "upstream broke"}}, status_code=500)
        if mode == "429":
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "1"}
            )
        if mode == "401":
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401)
        if mode == "html":
            return Response("<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        if mode == "invalid_json":
            return Response('{"choices": [{"index": 0, "mess', media_type="application/json")
        if mode == "hang":
            await asyncio.sleep(3)
        if body.get("stream"):
            words = {"truncated": ["hola"], "empty_stream": []}.get(mode, ANSWER.split(" "))
            chunks = openai_chunks(body, words, finish=mode not in ("truncated", "empty_stream"))
            return StreamingResponse(iter(chunks), media_type="text/event-stream")
        return openai_answer(body)

    return app


def anthropic_app() -> FastAPI:
    """Anthropic's /v1/messages, answering ANSWER (streamed as its events when asked)."""
    app = FastAPI()
    app.state.settings = ServerSettings(_env_file=None)
    app.state.seen = []

    @app.post("/v1/messages")
    async def messages(request: Request):
        body = await request.json()
        app.state.seen.append((dict(request.headers), body))
        if not body.get("stream"):
            return {
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": ANSWER}], "stop_reason": "max_tokens",
                "usage": {"input_tokens": 7, "output_tokens": 4},
            }  # fmt: skip
        events = [("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 7}}}),
                  ("ping", {"type": "ping"})]  # fmt: skip
        events += [
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
            )
            for w in ("hola ", "desde ", "arriba")
        ]
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
                   ("message_stop", {"type": "message_stop"})]  # fmt: skip
        text = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
        return Response(text, media_type="text/event-stream")

    return app


def write_providers(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def metric(name: str, **labels) -> float:
    """A counter's current value in this process's Prometheus registry (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def provider_metrics(provider: str) -> dict[str, float]:
    failures = sum(
        metric("semilla_provider_failures_total", provider=provider, reason=r)
        for r in ("timeout", "connection", "status", "invalid")
    )
    return {
        "calls": metric("semilla_provider_calls_total", provider=provider),
        "successes": metric("semilla_provider_successes_total", provider=provider),
        "failures": failures,
        "fallbacks": metric("semilla_provider_fallbacks_total", provider=provider),
        "skips": metric("semilla_provider_skips_total", provider=provider),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}
