"""Anthropic's Messages API: POST /v1/messages, as the official `anthropic` client uses it.

The request becomes the chat messages and settings every backend takes; the answer is
rendered as Anthropic's message object or its SSE events (message_start, content_block_start,
content_block_delta..., content_block_stop, message_delta, message_stop). Errors have
Anthropic's shape (serve/errors.py decides it by path); `x-api-key` is read by the hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import AfterValidator, Field, StrictBool, StrictStr

from semilla.serve.errors import APIError
from semilla.serve.protocol import MAX_STOP, Seed, TopK, TopP, zero_or_at_least_smallest
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.routes.openai import JSON_BODY, complete, generation_call, material_for, replay
from semilla.serve.serving import Choice, Generation, Result, new_id, sampling_config

log = logging.getLogger(__name__)
router = APIRouter(tags=["anthropic"])

# Anthropic's range
Temperature = Annotated[float, Field(ge=0.0, le=1.0), AfterValidator(zero_or_at_least_smallest)]


class ContentBlock(RequestBody):
    """A content block; only text ones can reach a text model (the others are a 400 naming them)."""

    type: StrictStr
    text: StrictStr | None = None


class Message(RequestBody):
    role: Literal["user", "assistant"]
    content: StrictStr | list[ContentBlock]


class MessagesRequest(RequestBody):
    model: StrictStr | None = None  # None: the only (or default) served model
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)]
    system: StrictStr | list[ContentBlock] | None = None
    stop_sequences: Annotated[list[StrictStr], Field(max_length=MAX_STOP)] = Field(default_factory=list)
    stream: StrictBool = False
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None  # semilla: a reproducible sample
    tools: list[dict] | None = None
    output_config: dict | None = None  # {"format": ...}: structured output, refused
    output_format: dict | None = None


def block_text(content: str | list[ContentBlock] | None, param: str) -> str:
    """The text of a content string or of text blocks; 400 naming a block of another type."""
    if content is None or isinstance(content, str):
        return content or ""
    for i, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise APIError(
                400, f"{param}.{i}: content blocks of type {block.type!r} are not supported (only text)",
                param=f"{param}.{i}.type",
            )  # fmt: skip
    return "".join(block.text for block in content)


def chat_messages(body: MessagesRequest) -> list[dict]:
    """The request as [{"role", "content"}] with the system prompt first."""
    messages = [{"role": "system", "content": block_text(body.system, "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        messages.append({"role": m.role, "content": block_text(m.content, f"messages.{i}.content")})
    return messages


def stop_reason(choice: Choice) -> str:
    if choice.finish_reason == "length":
        return "max_tokens"
    if choice.finish_reason == "content_filter":
        return "refusal"
    return "stop_sequence" if choice.stop_sequence else "end_turn"


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


@router.post("/v1/messages", dependencies=JSON_BODY)
async def create_message(body: MessagesRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    if body.tools:
        raise APIError(400, "tools are not supported on /v1/messages", param="tools")
    if body.output_format or (body.output_config or {}).get("format"):
        raise APIError(400, "structured output (output_config.format) is not supported on /v1/messages",
                       param="output_config.format")  # fmt: skip
    if len(body.messages) > state.settings.max_messages:
        raise APIError(400, f"too many messages: {len(body.messages)} (at most {state.settings.max_messages})",
                       param="messages")  # fmt: skip
    messages = chat_messages(body)
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    cfg = dataclasses.replace(sampling_config(body, body.max_tokens), stop=list(body.stop_sequences))
    call = generation_call(request, principal, cfg, True, 1, stream=body.stream)
    gen = backend.chat(messages, call)
    material = material_for(gen, "chat", messages, 1)
    mid = new_id("msg")

    def head(result: Result | None) -> dict:
        choice = result.choices[0] if result else None
        return {
            "id": mid, "type": "message", "role": "assistant", "model": gen.model,
            "content": [{"type": "text", "text": choice.text}] if choice else [],
            "stop_reason": stop_reason(choice) if choice else None,
            "stop_sequence": choice.stop_sequence if choice else None,
            "usage": {"input_tokens": result.prompt_tokens if result else gen.prompt_tokens,
                      "output_tokens": result.completion_tokens if result else 0},
        }  # fmt: skip

    async def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        """Anthropic's events; an error after the start becomes an `error` event."""
        is_job = isinstance(source, Generation)
        try:
            yield event("message_start", {"message": head(None)})
            yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            async for d in source.deltas() if is_job else replay(source):
                if d.text:
                    yield event(
                        "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d.text}}
                    )
            result = source.finish() if is_job else source
            choice = result.choices[0]
            yield event("content_block_stop", {"index": 0})
            delta = {"stop_reason": stop_reason(choice), "stop_sequence": choice.stop_sequence}
            yield event(
                "message_delta", {"delta": delta, "usage": {"output_tokens": result.completion_tokens}}
            )
            yield event("message_stop", {})
        except APIError as e:
            yield event("error", {"error": e.body("anthropic")["error"]})
        except Exception:  # the stream has started: report, never a broken socket
            log.exception("stream failed")
            yield event("error", {"error": {"type": "api_error", "message": "generation failed"}})

    def record(result: Result):
        return result.record(mid, gen.model, "chat", messages, extra={"api": "anthropic"})

    return await complete(request, principal, gen, material, body.stream, head, render_stream, record)
