"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions.

Each route: authorize, parse, ask the backend the model name resolves to for a Generation
(it checks the context length), consult the cache for deterministic local requests, run it,
render JSON or SSE, record the completion.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from semilla.serve import retrieval
from semilla.serve.errors import APIError
from semilla.serve.hooks import CompletionRecord, Principal
from semilla.serve.protocol import ChatCompletionRequest, CompletionRequest, tool_choice_name
from semilla.serve.serving import (
    ChoiceDelta,
    Generation,
    GenerationCall,
    Result,
    TokenInfo,
    new_id,
    run_to_end,
    sampling_config,
)
from semilla.serve.tools import (
    CallStream,
    Tool,
    ToolCall,
    call_format,
    checked_tools,
    forced_tools,
    parse_calls,
    render_messages,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


async def require_json(request: Request) -> None:
    """A body that is not declared JSON is refused before it is parsed (form posts, text).
    Async: on the event loop, not a thread-pool hop per request."""
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
    """The fields every response and chunk of one request share: id, object, created, model
    and fingerprint (those of whichever backend answers: a fallback chain decides at start)."""

    def __init__(self, cid: str, object_: str, gen: Generation):
        self.cid, self.object, self.created, self.gen = cid, object_, int(time.time()), gen

    def __call__(self, choices: list[dict], **extra) -> dict:
        head = {"id": self.cid, "object": self.object, "created": self.created, "model": self.gen.model,
                "system_fingerprint": self.gen.fingerprint}  # fmt: skip
        if self.gen.model_version is not None:  # an A/B route's variant
            head["model_version"] = self.gen.model_version
        return {**head, "choices": choices, **extra}


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
    return {"object": "list", "data": request.app.state.semilla.cards(principal.role == "admin")}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    principal = await request.app.state.hooks.authorize(request, "models")
    return request.app.state.semilla.backend(model_id).card(principal.role == "admin")


# --- shared flow -------------------------------------------------------------------------


async def complete(
    request: Request,
    principal: Principal,
    gen: Generation,
    material: dict | None,
    stream: bool,
    render: Callable[[Result], dict],
    render_stream: Callable[[Generation | Result], AsyncIterator[str]],
    record: Callable[[Result], CompletionRecord],
    media_type: str = "text/event-stream",
):
    """Cache lookup, run, cache store and record: the part every generating route shares
    (OpenAI's, Anthropic's and Ollama's; `render_stream` frames the stream in `media_type`)."""
    hooks = request.app.state.hooks
    if material is not None:
        cached = hooks.cache_get(principal, material)
        if cached is not None:
            # a hit has its own id: recorded too, so feedback and conversations can refer to it
            hit = dataclasses.replace(record(cached), latency_ms=0.0)
            await record_now(hooks, principal, hit)
            if stream:
                return StreamingResponse(render_stream(cached), media_type=media_type)
            return render(cached)
    await gen.start()

    async def finished(result: Result) -> None:
        """Cache and record; a conversation turn is on disk before the client hears the end."""
        if material is not None and result.complete:  # never a failed, filtered or cut answer
            hooks.cache_put(principal, material, result, result.size())
        await record_now(hooks, principal, record(result))

    if stream:

        async def events() -> AsyncIterator[str]:
            last = None  # the stream's last chunk ([DONE], message_stop, done: true) waits for the record
            async for chunk in render_stream(gen):
                if last is not None:
                    yield last
                last = chunk
            await finished(gen.finish())  # a stream that failed is recorded as such, never cached
            if last is not None:
                yield last

        return StreamingResponse(
            events(), media_type=media_type, headers={"Cache-Control": "no-cache", **gen.headers}
        )
    result = await run_to_end(request, gen)
    await finished(result)
    return JSONResponse(render(result), headers=gen.headers)


async def record_now(hooks, principal: Principal, record: CompletionRecord) -> None:
    """Record a completion: a conversation turn is written before this returns, in a worker
    thread; anything else is only queued, on the event loop (no thread-pool hop per request)."""
    if record.conversation_id:
        await run_in_threadpool(hooks.record_completion, principal, record)
    else:
        hooks.record_completion(principal, record)


async def replay(result: Result) -> AsyncIterator[ChoiceDelta]:
    """A cached result as deltas: one per stored token when logprobs were kept (then the text
    they do not spell, if any, and the finish), else each choice's whole text in one piece."""
    for c in result.choices:
        spelled = ""
        for t in c.tokens:
            spelled += t.text
            yield ChoiceDelta(c.index, t.text, [t])
        yield ChoiceDelta(c.index, c.text[len(spelled) :], [], c.finish_reason)


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


def generation_call(
    request: Request, principal: Principal, cfg, asked: bool, n: int, user: str | None = None, **fields
) -> GenerationCall:
    """The call a backend gets: outputs pass the content filter and generated tokens count
    against the caller's tokens-per-minute budget, however the request ends. `user`: the
    request's own end-user id (OpenAI's `user`), which A/B routes keep on one variant."""
    hooks = request.app.state.hooks
    return GenerationCall(
        cfg,
        asked=asked,
        n=n,
        screen=hooks.screen_output if hooks.screens_output else None,
        on_tokens=lambda tokens: hooks.record_tokens(principal, tokens),
        user_key=user_key(request, principal, user),
        **fields,
    )


def user_key(request: Request, principal: Principal, user: str | None) -> str:
    """Who asks, for stickiness: the end user the request names, else the account, else the
    API key, else the client's address."""
    if user:
        return f"end-user:{user}"
    if principal.user_id is not None:
        return f"user:{principal.user_id}"
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"address:{request.client.host if request.client else ''}"


def constraints(call: GenerationCall) -> dict:
    """What else shapes a deterministic answer beyond its settings (part of its cache key)."""
    return {"output": call.output and call.output.schema, "logit_bias": call.logit_bias}


def material_for(gen: Generation, route: str, prompt: Any, n: int, extra: dict | None = None) -> dict | None:
    """What a deterministic answer is cached under; None when it must not be cached."""
    if not (gen.cacheable and is_deterministic(gen.cfg)):
        return None
    return cache_material(route, gen.model, prompt, gen.cfg, n, extra)


# --- chat --------------------------------------------------------------------------------


@router.post("/v1/chat/completions", dependencies=JSON_BODY)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    if len(body.messages) > state.settings.max_messages:
        raise APIError(
            400,
            f"too many messages: {len(body.messages)} (at most {state.settings.max_messages})",
            param="messages",
        )
    offered, forced = chat_tools(body)
    messages = render_messages(chat_turns(body), offered)
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    grounded = {}  # semilla's RAG: {"sources": [...]} in the response
    if body.rag is not None:
        messages, found = await retrieval.ground(request, principal, body.rag, messages, backend.fits)
        grounded = {"sources": found}
    asked = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    top = (body.top_logprobs or 0) if body.logprobs else None
    cfg = sampling_config(body, asked or state.settings.default_max_tokens, top)
    cfg = dataclasses.replace(cfg, stop=body.stop_list())
    output = body.response_format.output() if body.response_format else None
    if forced:  # a call of these functions, whatever else was asked
        output = call_format(forced, body.parallel_tool_calls)
    call = generation_call(
        request, principal, cfg, asked is not None, body.n, body.user, stream=body.stream, param=param,
        output=output, logit_bias=body.logit_bias,
    )  # fmt: skip
    gen = backend.chat(messages, call)
    material = material_for(gen, "chat", messages, body.n, constraints(call))
    cid = new_id("chatcmpl")
    full, part = Envelope(cid, "chat.completion", gen), Envelope(cid, "chat.completion.chunk", gen)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def answer(c) -> tuple[dict, str | None]:
        """The assistant message of a choice, and its finish_reason: a call when it parses as one."""
        calls = parse_calls(c.text, offered) if offered else None
        if calls:
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [t.openai() for t in calls],
            }, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason

    def render(result: Result) -> dict:
        return full(
            [
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": {"content": [t.openai() for t in c.tokens]} if body.logprobs else None,
                    "finish_reason": finish,
                }
                for c in result.choices
                for message, finish in [answer(c)]
            ],
            usage=result.usage(),
            **grounded,
        )

    def chunk(choices: list[dict], usage: dict | None = None, **extra) -> dict:
        return part(choices, usage=usage, **extra) if include_usage else part(choices, **extra)

    def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Generation)
        role_sent: set[int] = set()
        held = {i: CallStream(offered, bool(forced)) for i in range(body.n)} if offered else None

        def make_chunk(d) -> dict | None:
            delta: dict[str, Any] = {}
            text, calls, finish = d.text, None, d.finish_reason
            if held is not None:  # an answer that may be a call is held back until it is known
                text, calls = held[d.index].push(d.text, finish is not None)
            if d.index not in role_sent:
                role_sent.add(d.index)
                delta["role"] = "assistant"
            if calls:
                delta["tool_calls"], finish = [t.openai(i) for i, t in enumerate(calls)], "tool_calls"
            elif text or "role" in delta:
                delta["content"] = text
            if not delta and not finish and not d.tokens:
                return None
            logprobs = {"content": [t.openai() for t in d.tokens]} if body.logprobs else None
            first = len(role_sent) == 1 and "role" in delta  # the sources travel with the first chunk
            return chunk(
                [{"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
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
            cid, gen.model, "chat", messages, conversation_id=body.conversation_id, extra=user
        )

    return await complete(request, principal, gen, material, body.stream, render, render_stream, record)


def chat_turns(body: ChatCompletionRequest) -> list[dict]:
    """The messages as {"role", "content"} (+ "tool_calls" on assistant turns, + the function's
    "name" on tool turns, found from the call it answers)."""
    names: dict[str, str] = {}
    turns = []
    for i, m in enumerate(body.messages):
        turn = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(f"messages.{i}.content"),
        }
        if m.tool_calls:
            turn["tool_calls"] = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
            names |= {c.id: c.function.name for c in m.tool_calls}
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"messages.{i}.tool_call_id is required on tool messages",
                               param=f"messages.{i}.tool_call_id")  # fmt: skip
            turn["name"] = names.get(m.tool_call_id) or m.name
        turns.append(turn)
    return turns


def chat_tools(body: ChatCompletionRequest) -> tuple[list[Tool], list[Tool] | None]:
    """The tools shown to the model (none for tool_choice 'none') and those it must call."""
    declared = [
        Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []
    ]
    choice = tool_choice_name(body.tool_choice)
    if choice is not None and choice != "none" and not declared:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    tools = checked_tools(declared)
    forced = forced_tools(tools, choice)
    return ([] if choice == "none" else tools), forced


# --- completions -------------------------------------------------------------------------


@router.post("/v1/completions", dependencies=JSON_BODY)
async def completions(body: CompletionRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by semilla models", param="suffix")
    raw = body.prompt
    token_ids = isinstance(raw, list) and bool(raw) and not isinstance(raw[0], str)  # one list or several
    prompt = list(raw) if token_ids else [raw] if isinstance(raw, str) else list(raw)
    if not token_ids:
        for t in prompt:
            hooks.screen_prompt(principal, t)
    max_tokens = state.settings.default_max_tokens if body.max_tokens is None else body.max_tokens
    cfg = sampling_config(body, max_tokens, body.logprobs)
    cfg = dataclasses.replace(cfg, stop=body.stop_list())
    call = generation_call(
        request,
        principal,
        cfg,
        body.max_tokens is not None,
        body.n,
        body.user,
        stream=body.stream,
        prompt_param="prompt",
        logit_bias=body.logit_bias,
        score_prompt=body.echo and body.logprobs is not None,
    )
    gen = backend.complete(prompt, call)
    texts = gen.texts
    if token_ids:
        for t in texts:
            hooks.screen_prompt(principal, t)
    material = material_for(
        gen, "completions", prompt, body.n, {"echo": body.echo, "texts": texts, **constraints(call)}
    )
    envelope = Envelope(new_id("cmpl"), "text_completion", gen)
    cid = envelope.cid
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def echo_prefix(index: int) -> str:
        return texts[index // body.n] if body.echo else ""

    def legacy_logprobs(tokens: list[TokenInfo], start: int = 0) -> dict:
        """OpenAI's legacy logprobs of these tokens, the first at `start` in the text."""
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t.text)
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
            "text_offset": offsets,
        }

    def choice_logprobs(c, source: Generation | Result) -> dict | None:
        """The choice's tokens, after its prompt's when echoed and scored."""
        if body.logprobs is None:
            return None
        prompt_tokens = source.prompt_logprobs[c.index // body.n] if source.prompt_logprobs else []
        return legacy_logprobs(prompt_tokens + c.tokens)

    def render(result: Result) -> dict:
        return envelope(
            [
                {
                    "index": c.index,
                    "text": echo_prefix(c.index) + c.text,
                    "logprobs": choice_logprobs(c, result),
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ],
            usage=result.usage(),
        )

    def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Generation)
        echoed: set[int] = set()

        def make_chunk(d) -> dict | None:
            text, scored = d.text, []
            if d.index not in echoed:
                echoed.add(d.index)
                text = echo_prefix(d.index) + text
                scored = source.prompt_logprobs[d.index // body.n] if source.prompt_logprobs else []
            if not text and not d.finish_reason:
                return None
            logprobs = None
            if body.logprobs is not None and (d.tokens or scored):
                logprobs = legacy_logprobs(scored + d.tokens)
                del logprobs["text_offset"]
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
            cid, gen.model, "completions", prompt, extra={"user": body.user} if body.user else {}
        )

    return await complete(request, principal, gen, material, body.stream, render, render_stream, record)
