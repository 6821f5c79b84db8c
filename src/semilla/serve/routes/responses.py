"""OpenAI's Responses API: POST /v1/responses, as the `openai` client's `responses.create` and
`responses.stream` use it, for text: `input` (a string or messages), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, and the streamed events response.created,
response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done,
response.output_item.done and response.completed (response.incomplete when the answer was
cut by max_output_tokens). Responses are not stored: previous_response_id, tools and
non-text formats are a 400.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictStr

from semilla.serve.errors import APIError
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.protocol import Seed, Temperature, TopP
from semilla.serve.routes.openai import JSON_BODY, complete, generation_call, material_for, replay
from semilla.serve.serving import Generation, Result, new_id, sampling_config

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


class InputPart(RequestBody):
    type: StrictStr  # input_text and output_text are text; the others are a 400 naming them
    text: StrictStr | None = None


class InputItem(RequestBody):
    type: StrictStr = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: StrictStr | list[InputPart] = ""


class TextFormat(RequestBody):
    type: StrictStr = "text"


class TextOptions(RequestBody):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(RequestBody):
    model: StrictStr | None = None
    input: StrictStr | Annotated[list[InputItem], Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None  # semilla: a reproducible sample
    stream: StrictBool = False
    previous_response_id: StrictStr | None = None
    tools: list[dict] | None = None
    text: TextOptions | None = None
    user: StrictStr | None = None


def item_text(item: InputItem, index: int) -> str:
    """The text of one input message; 400 naming an item or part semilla cannot read."""
    if item.type != "message" or item.role is None:
        raise APIError(400, f"input.{index}: items of type {item.type!r} are not supported (only messages)",
                       param=f"input.{index}.type")  # fmt: skip
    if isinstance(item.content, str):
        return item.content
    for j, part in enumerate(item.content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise APIError(400, f"input.{index}.content.{j}: parts of type {part.type!r} are not supported "
                           "(only text)", param=f"input.{index}.content.{j}.type")  # fmt: skip
    return "".join(part.text for part in item.content)


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """`instructions` as the system message, then the input as [{"role", "content"}]."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        role = "system" if item.role == "developer" else item.role
        messages.append({"role": role, "content": item_text(item, i)})
    return messages


def refuse_unsupported(body: ResponsesRequest) -> None:
    if body.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server does not store responses",
                       param="previous_response_id")  # fmt: skip
    if body.tools:
        raise APIError(400, "tools are not supported on /v1/responses", param="tools")
    if body.text is not None and body.text.format.type != "text":
        raise APIError(400, f"text.format {body.text.format.type!r} is not supported (only 'text')",
                       param="text.format")  # fmt: skip


@router.post("/v1/responses", dependencies=JSON_BODY)
async def create_response(body: ResponsesRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    refuse_unsupported(body)
    messages = chat_messages(body)
    if len(messages) > state.settings.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} (at most {state.settings.max_messages})",
                       param="input")  # fmt: skip
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    asked = body.max_output_tokens
    cfg = sampling_config(body, asked or state.settings.default_max_tokens)
    call = generation_call(request, principal, cfg, asked is not None, 1, stream=body.stream,
                           param="max_output_tokens", prompt_param="input")  # fmt: skip
    gen = backend.chat(messages, call)
    material = material_for(gen, "chat", messages, 1)
    rid, item_id, created = new_id("resp"), new_id("msg"), int(time.time())

    def message(text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [part] if status == "completed" else []}  # fmt: skip

    def response(result: Result | None) -> dict:
        cut = result is not None and result.choices[0].finish_reason == "length"
        status = "in_progress" if result is None else "incomplete" if cut else "completed"
        usage = None
        if result is not None:
            usage = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip
        return {
            "id": rid, "object": "response", "created_at": created, "status": status, "model": gen.model,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "output": [message(result.choices[0].text, "completed")] if result else [],
            "parallel_tool_calls": False, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "usage": usage, "metadata": {}, "store": False,
        }  # fmt: skip

    async def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Generation)
        sequence = 0

        def event(name: str, **data) -> str:
            nonlocal sequence
            sequence += 1
            payload = {"type": name, "sequence_number": sequence - 1, **data}
            return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        try:
            yield event("response.created", response=response(None))
            yield event("response.in_progress", response=response(None))
            yield event("response.output_item.added", output_index=0, item=message("", "in_progress"))
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event("response.content_part.added", **where, part=empty)
            async for d in source.deltas() if is_job else replay(source):
                if d.text:
                    yield event("response.output_text.delta", **where, delta=d.text, logprobs=[])
            result = source.finish() if is_job else source
            final = response(result)
            item = final["output"][0]
            yield event("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(
                f"response.{'completed' if final['status'] == 'completed' else 'incomplete'}", response=final
            )
        except APIError as e:
            yield event("error", code=e.code or e.type, message=e.message, param=e.param)
        except Exception:  # the stream has started: report, never a broken socket
            log.exception("stream failed")
            yield event("error", code="server_error", message="generation failed", param=None)

    def record(result: Result):
        extra = {"api": "responses", **({"user": body.user} if body.user else {})}
        return result.record(rid, gen.model, "chat", messages, extra=extra)

    return await complete(request, principal, gen, material, body.stream, response, render_stream, record)
