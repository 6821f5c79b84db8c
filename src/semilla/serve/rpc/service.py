"""The Semilla gRPC service: the HTTP API's models, chat and completions over gRPC.

Each call goes the way an HTTP request does: the caller is authorized by the same hooks
(metadata `authorization: Bearer ...` is the HTTP header it stands for: same keys, tokens,
scopes and rate limits), the request is validated by the HTTP API's own schemas, a backend
answers it as a `Generation` (the same engine), and the completion is recorded. An `APIError`
becomes the gRPC status of its HTTP status (see STATUS_OF_HTTP); a client that cancels frees its
engine slots, because the cancellation reaches the generation's `deltas()` as it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from semilla.serve import metrics
from semilla.serve.accounts import DATABASE_RETRY_AFTER_S
from semilla.serve.errors import APIError, validation_error
from semilla.serve.hooks import Principal
from semilla.serve.protocol import ChatCompletionRequest, CompletionRequest
from semilla.serve.rpc import SERVICE, stubs
from semilla.serve.serving import Generation, GenerationCall, Result, new_id, sampling_config

log = logging.getLogger(__name__)
pb, services = stubs()

# grpc-prometheus' names and labels, so its dashboards and alerts work as they are
HANDLED = Counter(
    "grpc_server_handled", "gRPC calls finished, by method and status code", ["grpc_method", "grpc_code"]
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to a gRPC call's end (streams: to the last message)",
    ["grpc_method"],
    buckets=metrics.LATENCY_BUCKETS,
)

STATUS_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "frequency_penalty", "presence_penalty", "seed", "n", "min_tokens")  # fmt: skip


def status_of(e: APIError) -> grpc.StatusCode:
    return STATUS_OF_HTTP.get(e.status, grpc.StatusCode.INTERNAL)


def http_request(app, context: grpc.aio.ServicerContext, method: str) -> Request:
    """The HTTP request a gRPC call stands for, as the accounts hooks read one: its metadata
    as headers (`authorization`), its peer as the client address (per-IP limits)."""
    headers = [
        (key.encode("latin-1"), value.encode("latin-1"))
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)  # '-bin' metadata carries bytes: never a credential
    ]
    scope = {"type": "http", "method": "POST", "path": method, "headers": headers, "query_string": b"",
             "client": peer_address(context.peer()), "app": app}  # fmt: skip
    return Request(scope)


def peer_address(peer: str) -> tuple[str, int] | None:
    """'ipv4:127.0.0.1:5000' -> ('127.0.0.1', 5000); '[::1]' unbracketed; None for a unix socket."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def validated(schema: type[BaseModel], fields: dict) -> Any:
    """`fields` checked by the HTTP API's own schema; INVALID_ARGUMENT naming the bad one."""
    try:
        return schema.model_validate(fields)
    except ValidationError as e:
        raise validation_error(RequestValidationError(e.errors())) from None


def sampling(message) -> dict:
    """The Sampling message's set fields, under the HTTP API's names."""
    fields = {name: getattr(message, name) for name in SAMPLING_FIELDS if message.HasField(name)}
    if message.stop:
        fields["stop"] = list(message.stop)
    return fields


def usage(result: Result):
    return pb.Usage(**result.usage())


class SemillaService(services.SemillaServicer):
    """The servicer: one instance per server, sharing the FastAPI app's state and hooks."""

    def __init__(self, app):
        self.app = app
        self.state, self.settings = app.state.semilla, app.state.settings

    @property
    def hooks(self):
        return self.app.state.hooks  # set by accounts.install after the app is made

    @asynccontextmanager
    async def call(self, context: grpc.aio.ServicerContext, method: str, scope: str = "models"):
        """Authorize the caller (yields the Principal); errors become gRPC statuses, and every
        call is counted and timed."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield await self.hooks.authorize(http_request(self.app, context, f"/{SERVICE}/{method}"), scope)
        except APIError as e:
            code = status_of(e)
            retry = e.headers.get("Retry-After")
            await context.abort(code, e.message, trailing_metadata=(("retry-after", retry),) if retry else ())
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except (OperationalError, InterfaceError) as e:  # the database is down or restarting, as over HTTP
            log.error("database unavailable on gRPC %s: %s", method, str(e).splitlines()[0])
            code, retry = grpc.StatusCode.UNAVAILABLE, str(DATABASE_RETRY_AFTER_S)
            await context.abort(code, "the database is unavailable; retry shortly", (("retry-after", retry),))
        except Exception:
            log.exception("gRPC %s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, "internal server error")
        finally:
            HANDLED.labels(method, code.name).inc()
            HANDLING_SECONDS.labels(method).observe(time.perf_counter() - started)

    def generation_call(self, principal: Principal, body, stream: bool, **fields) -> GenerationCall:
        """What the backend gets: the request's sampling settings, the content filter on the
        output, and the generated tokens counted against the caller's budget."""
        hooks = self.hooks
        cfg = sampling_config(body, body.max_tokens or self.settings.default_max_tokens)
        cfg = dataclasses.replace(cfg, stop=body.stop_list())
        return GenerationCall(
            cfg,
            asked=body.max_tokens is not None,
            n=body.n,
            stream=stream,
            screen=hooks.screen_output if hooks.screens_output else None,
            on_tokens=lambda tokens: hooks.record_tokens(principal, tokens),
            **fields,
        )

    # --- models ---------------------------------------------------------------------------

    async def ListModels(self, request, context):
        async with self.call(context, "ListModels") as principal:
            cards = self.state.cards(principal.role == "admin")
            models = [pb.Model(id=c["id"], owned_by=c.get("owned_by", ""), created=c.get("created", 0))
                      for c in cards]  # fmt: skip
            return pb.ListModelsResponse(models=models)

    # --- chat and completions -------------------------------------------------------------

    def chat(self, request, principal: Principal, stream: bool) -> tuple[Generation, Any]:
        fields = {"messages": [{"role": m.role, "content": m.content} for m in request.messages],
                  **sampling(request.sampling)}  # fmt: skip
        for name in ("model", "user", "conversation_id"):
            if getattr(request, name):
                fields[name] = getattr(request, name)
        body = validated(ChatCompletionRequest, fields)
        if len(body.messages) > self.settings.max_messages:
            raise APIError(400, f"too many messages: {len(body.messages)} (at most "
                                f"{self.settings.max_messages})", param="messages")  # fmt: skip
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]  # fmt: skip
        for m in messages:
            self.hooks.screen_prompt(principal, m["content"])
        backend = self.state.backend(body.model)
        return backend.chat(messages, self.generation_call(principal, body, stream)), body

    def complete(self, request, principal: Principal, stream: bool) -> tuple[Generation, Any]:
        fields = {"prompt": request.prompt, **sampling(request.sampling)}
        for name in ("model", "user"):
            if getattr(request, name):
                fields[name] = getattr(request, name)
        body = validated(CompletionRequest, fields)
        self.hooks.screen_prompt(principal, body.prompt)
        backend = self.state.backend(body.model)
        call = self.generation_call(principal, body, stream, prompt_param="prompt")
        return backend.complete([body.prompt], call), body

    async def record(self, principal: Principal, gen: Generation, body, cid: str, route: str) -> None:
        """Store the finished completion as the HTTP routes do (request log, conversation turn)."""
        prompt = gen.texts if route == "chat" else gen.texts[0]
        record = gen.finish().record(
            cid,
            gen.model,
            route,
            prompt,
            conversation_id=getattr(body, "conversation_id", None),
            extra={"user": body.user} if body.user else {},
        )
        await run_in_threadpool(self.hooks.record_completion, principal, record)

    async def answer(self, gen: Generation, body, principal: Principal, route: str):
        """The whole answer of a generation, recorded."""
        cid = new_id("chatcmpl" if route == "chat" else "cmpl")
        await gen.start()
        try:
            result = await gen.result()
        finally:
            gen.cancel()
        await self.record(principal, gen, body, cid, route)
        choices = [pb.Choice(index=c.index, text=c.text, finish_reason=c.finish_reason or "")
                   for c in result.choices]  # fmt: skip
        return pb.GenerationResponse(id=cid, model=gen.model, choices=choices, usage=usage(result))

    async def chunks(self, gen: Generation, body, principal: Principal, route: str) -> AsyncIterator:
        """The generation's text as it comes, then its usage; recorded before the last message."""
        cid = new_id("chatcmpl" if route == "chat" else "cmpl")
        await gen.start()
        try:
            async for d in gen.deltas():
                if d.text or d.finish_reason:
                    yield pb.GenerationChunk(id=cid, model=gen.model, index=d.index, text=d.text,
                                             finish_reason=d.finish_reason or "")  # fmt: skip
        finally:
            gen.cancel()  # the client left, or the stream failed: the engine slots are freed now
        await self.record(principal, gen, body, cid, route)
        yield pb.GenerationChunk(id=cid, model=gen.model, usage=usage(gen.finish()))

    async def Chat(self, request, context):
        async with self.call(context, "Chat") as principal:
            gen, body = self.chat(request, principal, stream=False)
            return await self.answer(gen, body, principal, "chat")

    async def ChatStream(self, request, context):
        async with self.call(context, "ChatStream") as principal:
            gen, body = self.chat(request, principal, stream=True)
            async for chunk in self.chunks(gen, body, principal, "chat"):
                yield chunk

    async def Complete(self, request, context):
        async with self.call(context, "Complete") as principal:
            gen, body = self.complete(request, principal, stream=False)
            return await self.answer(gen, body, principal, "completions")

    async def CompleteStream(self, request, context):
        async with self.call(context, "CompleteStream") as principal:
            gen, body = self.complete(request, principal, stream=True)
            async for chunk in self.chunks(gen, body, principal, "completions"):
                yield chunk
