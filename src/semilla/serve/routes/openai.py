"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions.

Each route: authorize, validate against the model (context length), consult the cache for
deterministic requests, run a Job, render JSON or SSE, record the completion.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from semilla import __version__
from semilla.errors import SemillaError
from semilla.serve import retrieval
from semilla.serve.errors import APIError
from semilla.serve.hooks import CompletionRecord, Principal
from semilla.serve.protocol import ChatCompletionRequest, CompletionRequest
from semilla.serve.serving import (
    ChoiceDelta,
    Job,
    Result,
    fit_max_tokens,
    new_id,
    run_to_end,
    sampling_config,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
FINGERPRINT = f"semilla-{__version__}"


def require_json(request: Request) -> None:
    """A body that is not declared JSON is refused before it is parsed (form posts, text)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {kind or 'none'!r}",
            code="unsupported_media_type",
        )


JSON_BODY = [Depends(require_json)]


DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Envelope:
    """The fields every response and chunk of one request share: id, object, created, model."""

    def __init__(self, cid: str, object_: str, model: str):
        self.head = {"id": cid, "object": object_, "created": int(time.time()), "model": model,
                     "system_fingerprint": FINGERPRINT}  # fmt: skip

    def __call__(self, choices: list[dict], **extra) -> dict:
        return {**self.head, "choices": choices, **extra}


def is_deterministic(cfg) -> bool:
    return cfg.temperature == 0 or cfg.seed is not None


def cache_material(route: str, model: str, prompt: Any, cfg, n: int, extra: dict | None = None) -> dict:
    return {
        "route": route,
        "model": model,
        "prompt": prompt,
        "n": n,
        "settings": dataclasses.asdict(cfg),
        **(extra or {}),
    }


# --- models ------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    principal = await request.app.state.hooks.authorize(request, "models")
    admin = principal.role == "admin"
    return {"object": "list", "data": [m.card(admin) for m in request.app.state.semilla.models.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    principal = await request.app.state.hooks.authorize(request, "models")
    return request.app.state.semilla.model(model_id).card(principal.role == "admin")


# --- shared flow -------------------------------------------------------------------------


async def complete(
    request: Request,
    principal: Principal,
    job: Job,
    material: dict | None,
    stream: bool,
    render: Callable[[Result], dict],
    render_stream: Callable[[Job | Result], AsyncIterator[str]],
    record: Callable[[Result], CompletionRecord],
):
    """Cache lookup, run, cache store and record: the part chat and completions share."""
    hooks = request.app.state.hooks
    if material is not None:
        cached = hooks.cache_get(principal, material)
        if cached is not None:
            # a hit has its own id: recorded too, so feedback and conversations can refer to it
            hit = dataclasses.replace(record(cached), latency_ms=0.0)
            await run_in_threadpool(hooks.record_completion, principal, hit)
            if stream:
                return StreamingResponse(render_stream(cached), media_type="text/event-stream")
            return render(cached)
    job.submit()

    async def finished(result: Result) -> None:
        """Cache and record; a conversation turn is on disk before the client hears the end."""
        if material is not None and result.complete:  # never a failed, filtered or cut answer
            hooks.cache_put(principal, material, result, result.size())
        await run_in_threadpool(hooks.record_completion, principal, record(result))

    if stream:

        async def events() -> AsyncIterator[str]:
            async for chunk in render_stream(job):
                if chunk == DONE:
                    break
                yield chunk
            await finished(job.finish())  # a stream that failed is recorded as such, never cached
            yield DONE

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    result = await run_to_end(request, job)
    await finished(result)
    return render(result)


async def replay(result: Result) -> AsyncIterator[ChoiceDelta]:
    """A cached result as deltas: one per stored token when logprobs were kept, else each
    choice's whole text in one piece."""
    for c in result.choices:
        if c.tokens and "".join(t.text for t in c.tokens) == c.text:
            for i, t in enumerate(c.tokens):
                yield ChoiceDelta(c.index, t.text, t, c.finish_reason if i == len(c.tokens) - 1 else None)
        else:
            yield ChoiceDelta(c.index, c.text, None, c.finish_reason)


async def stream_guard(
    deltas: AsyncIterator, make_chunk: Callable, tail: Callable[[], list]
) -> AsyncIterator[str]:
    """SSE chunks; an error mid-stream becomes an error event, and [DONE] always ends it."""
    try:
        async for delta in deltas:
            chunk = make_chunk(delta)
            if chunk is not None:
                yield sse(chunk)
        for chunk in tail():
            yield sse(chunk)
    except APIError as e:
        yield sse(e.body())
    except Exception:  # the stream has started: report, never a broken socket
        log.exception("stream failed")
        yield sse(APIError(500, "generation failed", type="server_error").body())
    yield DONE


def new_job(request: Request, principal: Principal, served, prompts: list[list[int]], cfg, n: int) -> Job:
    """A Job whose outputs pass the content filter and whose tokens count against the
    caller's tokens-per-minute budget, however the request ends."""
    hooks = request.app.state.hooks
    return Job(
        request.app.state.semilla.engine,
        served,
        prompts,
        cfg,
        n,
        screen=hooks.screen_output if hooks.screens_output else None,
        on_tokens=lambda tokens: hooks.record_tokens(principal, tokens),
    )


def settings_or_400(build: Callable):
    try:
        return build().validate()
    except SemillaError as e:
        raise APIError(400, str(e), code="invalid_value") from e


# --- chat --------------------------------------------------------------------------------


@router.post("/v1/chat/completions", dependencies=JSON_BODY)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    served = state.model(body.model)
    if len(body.messages) > state.settings.max_messages:
        raise APIError(
            400,
            f"too many messages: {len(body.messages)} (at most {state.settings.max_messages})",
            param="messages",
        )
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    grounded = {}  # semilla's RAG: {"sources": [...]} in the response
    if body.rag is not None:
        tokenizer, context = served.lm.tokenizer, served.lm.context_length
        messages, found = await retrieval.ground(
            request, principal, body.rag, messages, lambda m: len(tokenizer.apply_chat_template(m)) < context
        )
        grounded = {"sources": found}
    prompt = served.lm.tokenizer.apply_chat_template(messages)
    asked = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_new = fit_max_tokens(served, len(prompt), asked, state.settings.default_max_tokens, param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    cfg = settings_or_400(
        lambda: dataclasses.replace(sampling_config(body, max_new, top), stop=body.stop_list())
    )
    job = new_job(request, principal, served, [prompt], cfg, body.n)
    material = cache_material("chat", served.id, messages, cfg, body.n) if is_deterministic(cfg) else None
    cid = new_id("chatcmpl")
    full, part = (
        Envelope(cid, "chat.completion", served.id),
        Envelope(cid, "chat.completion.chunk", served.id),
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def render(result: Result) -> dict:
        return full(
            [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": [t.openai() for t in c.tokens]} if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ],
            usage=result.usage(),
            **grounded,
        )

    def chunk(choices: list[dict], usage: dict | None = None, **extra) -> dict:
        return part(choices, usage=usage, **extra) if include_usage else part(choices, **extra)

    def render_stream(source: Job | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Job)
        role_sent: set[int] = set()

        def make_chunk(d) -> dict | None:
            delta: dict[str, Any] = {}
            if d.index not in role_sent:
                role_sent.add(d.index)
                delta["role"] = "assistant"
            if d.text or "role" in delta:
                delta["content"] = d.text
            if not delta and not d.finish_reason and d.token is None:
                return None
            logprobs = {"content": [d.token.openai()] if d.token else []} if body.logprobs else None
            first = len(role_sent) == 1 and "role" in delta  # the sources travel with the first chunk
            return chunk(
                [{"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason}],
                **(grounded if first else {}),
            )

        def tail() -> list:
            if not include_usage:
                return []
            result = source.finish() if is_job else source
            return [chunk([], result.usage())]

        return stream_guard(source.deltas() if is_job else replay(source), make_chunk, tail)

    def record(result: Result) -> CompletionRecord:
        user = {"user": body.user} if body.user else {}
        return result.record(
            cid, served.id, "chat", messages, conversation_id=body.conversation_id, extra=user
        )

    return await complete(request, principal, job, material, body.stream, render, render_stream, record)


# --- completions -------------------------------------------------------------------------


@router.post("/v1/completions", dependencies=JSON_BODY)
async def completions(body: CompletionRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    served = state.model(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by semilla models", param="suffix")
    raw = body.prompt
    if isinstance(raw, list) and raw and isinstance(raw[0], int):
        vocab = served.lm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in raw):  # checked before decoding: any int reaches here
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        texts, prompts = [served.lm.tokenizer.decode(raw)], [list(raw)]
    else:
        texts = [raw] if isinstance(raw, str) else list(raw)
        prompts = [served.lm.tokenizer.encode(t) or [served.lm.tokenizer.bos_id] for t in texts]
    for t in texts:
        hooks.screen_prompt(principal, t)
    max_new = min(
        fit_max_tokens(
            served, len(p), body.max_tokens, state.settings.default_max_tokens, "max_tokens", "prompt"
        )
        for p in prompts
    )
    cfg = settings_or_400(
        lambda: dataclasses.replace(sampling_config(body, max_new, body.logprobs), stop=body.stop_list())
    )
    job = new_job(request, principal, served, prompts, cfg, body.n)
    material = (
        cache_material("completions", served.id, prompts, cfg, body.n, {"echo": body.echo, "texts": texts})
        if is_deterministic(cfg)
        else None
    )
    envelope = Envelope(new_id("cmpl"), "text_completion", served.id)
    cid = envelope.head["id"]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def echo_prefix(index: int) -> str:
        return texts[index // body.n] if body.echo else ""

    def legacy_logprobs(c) -> dict | None:
        if body.logprobs is None:
            return None
        offsets, pos = [], len(echo_prefix(c.index))
        for t in c.tokens:
            offsets.append(pos)
            pos += len(t.text)
        return {
            "tokens": [t.text for t in c.tokens],
            "token_logprobs": [t.logprob for t in c.tokens],
            "top_logprobs": [dict(t.top) for t in c.tokens],
            "text_offset": offsets,
        }

    def render(result: Result) -> dict:
        return envelope(
            [
                {
                    "index": c.index,
                    "text": echo_prefix(c.index) + c.text,
                    "logprobs": legacy_logprobs(c),
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ],
            usage=result.usage(),
        )

    def render_stream(source: Job | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Job)
        echoed: set[int] = set()

        def make_chunk(d) -> dict | None:
            text = d.text
            if d.index not in echoed:
                echoed.add(d.index)
                text = echo_prefix(d.index) + text
            if not text and not d.finish_reason:
                return None
            logprobs = None
            if body.logprobs is not None and d.token is not None:
                logprobs = {
                    "tokens": [d.token.text],
                    "token_logprobs": [d.token.logprob],
                    "top_logprobs": [dict(d.token.top)],
                }
            out = envelope(
                [{"index": d.index, "text": text, "logprobs": logprobs, "finish_reason": d.finish_reason}]
            )
            if include_usage:
                out["usage"] = None
            return out

        def tail() -> list:
            if not include_usage:
                return []
            result = source.finish() if is_job else source
            return [envelope([], usage=result.usage())]

        return stream_guard(source.deltas() if is_job else replay(source), make_chunk, tail)

    def record(result: Result) -> CompletionRecord:
        prompt = texts if len(texts) > 1 else texts[0]
        return result.record(
            cid, served.id, "completions", prompt, extra={"user": body.user} if body.user else {}
        )

    return await complete(request, principal, job, material, body.stream, render, render_stream, record)
