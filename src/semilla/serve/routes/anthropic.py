"""Anthropic's Messages API: POST /v1/messages, as the official `anthropic` client uses it.

The request becomes the chat messages and settings every backend takes; the answer is
rendered as Anthropic's message object or its SSE events (message_start, content_block_start,
content_block_delta..., content_block_stop, message_delta, message_stop). Errors have
Anthropic's shape (serve/errors.py decides it by path); `x-api-key` is read by the hooks.

`tools` and `tool_choice` (auto, any, tool, none) work as on /v1/chat/completions
(serve/tools.py): calls are tool_use blocks (stop_reason "tool_use"; streamed as
input_json_delta), and tool_use / tool_result blocks carry them back. `output_config.format`
(or the older `output_format`) of type json_schema constrains the answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import AfterValidator, Field, StrictBool, StrictStr

from semilla.serve.errors import APIError
from semilla.serve.protocol import MAX_STOP, Name, Seed, TopK, TopP, zero_or_at_least_smallest
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.routes.openai import (
    JSON_BODY,
    complete,
    constraints,
    generation_call,
    material_for,
    replay,
)
from semilla.serve.serving import Choice, Generation, Result, new_id, sampling_config
from semilla.serve.structured import OutputFormat, check_schema
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
router = APIRouter(tags=["anthropic"])

# Anthropic's range
Temperature = Annotated[float, Field(ge=0.0, le=1.0), AfterValidator(zero_or_at_least_smallest)]


class ContentBlock(RequestBody):
    """A content block: text, tool_use or tool_result reach a text model (others are a 400 naming them)."""

    type: StrictStr
    text: StrictStr | None = None
    id: StrictStr | None = None  # tool_use
    name: StrictStr | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: StrictStr | None = None  # tool_result
    content: StrictStr | list[ContentBlock] | None = None  # tool_result


class ToolDef(RequestBody):
    name: Name
    description: StrictStr = ""
    input_schema: dict[str, Any]


class ToolChoice(RequestBody):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool = False


class OutputFormatSpec(RequestBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class Message(RequestBody):
    role: Literal["user", "assistant"]
    content: StrictStr | list[ContentBlock]


class OutputConfig(RequestBody):
    format: OutputFormatSpec | None = None


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
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormatSpec | None = None  # the beta's name for output_config.format


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
    """The request as turns (serve/tools.py's shape) with the system prompt first: tool_use
    blocks become the assistant turn's tool_calls, tool_result blocks tool turns."""
    messages = [{"role": "system", "content": block_text(body.system, "system")}] if body.system else []
    names: dict[str, str] = {}
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        param = f"messages.{i}.content"
        calls = [b for b in m.content if b.type == "tool_use"]
        results = [(j, b) for j, b in enumerate(m.content) if b.type == "tool_result"]
        for j, b in results:
            text = (
                b.content
                if b.content is None or isinstance(b.content, str)
                else block_text(b.content, f"{param}.{j}.content")
            )
            messages.append({"role": "tool", "content": text or "", "name": names.get(b.tool_use_id or "")})
        text = block_text([b for b in m.content if b.type not in ("tool_use", "tool_result")], param)
        if calls:
            names |= {b.id or "": b.name or "" for b in calls}
            tool_calls = [ToolCall(b.id or "", b.name or "", json.dumps(b.input or {})) for b in calls]
            messages.append({"role": m.role, "content": text, "tool_calls": tool_calls})
        elif text or not results:
            messages.append({"role": m.role, "content": text})
    return messages


def message_tools(body: MessagesRequest) -> tuple[list[Tool], list[Tool] | None, bool]:
    """The tools shown to the model (none for tool_choice 'none'), those it must call, and
    whether several calls may come at once."""
    tools = checked_tools([Tool(t.name, t.description, t.input_schema) for t in body.tools or []])
    choice = body.tool_choice or ToolChoice(type="auto")
    if choice.type == "tool" and not choice.name:
        raise APIError(400, "tool_choice.name is required when type is 'tool'", param="tool_choice.name")
    named = {"any": "required", "tool": choice.name}.get(choice.type, choice.type)
    forced = forced_tools(tools, named, "tool_choice")
    return ([] if choice.type == "none" else tools), forced, not choice.disable_parallel_tool_use


def stop_reason_of(choice: Choice, calls: list[ToolCall] | None) -> str:
    return "tool_use" if calls else stop_reason(choice)


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
    if len(body.messages) > state.settings.max_messages:
        raise APIError(400, f"too many messages: {len(body.messages)} (at most {state.settings.max_messages})",
                       param="messages")  # fmt: skip
    offered, forced, parallel = message_tools(body)
    messages = render_messages(chat_messages(body), offered)
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    cfg = dataclasses.replace(sampling_config(body, body.max_tokens), stop=list(body.stop_sequences))
    fmt = (
        body.output_config.format if body.output_config and body.output_config.format else body.output_format
    )
    param = (
        "output_config.format.schema"
        if body.output_config and body.output_config.format
        else "output_format.schema"
    )
    output = OutputFormat(check_schema(fmt.schema_, param), param) if fmt else None
    if forced:
        output = call_format(forced, parallel)
    call = generation_call(request, principal, cfg, True, 1, stream=body.stream, output=output)
    gen = backend.chat(messages, call)
    material = material_for(gen, "chat", messages, 1, constraints(call))
    mid = new_id("msg")

    def answer(choice: Choice) -> tuple[list[dict], list[ToolCall] | None]:
        """The content blocks of the answer: its text, or its calls as tool_use blocks."""
        calls = parse_calls(choice.text, offered) if offered else None
        if calls:
            return [{"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name,
                     "input": json.loads(c.arguments)} for c in calls], calls  # fmt: skip
        return [{"type": "text", "text": choice.text}], None

    def head(result: Result | None) -> dict:
        choice = result.choices[0] if result else None
        blocks, calls = answer(choice) if choice else ([], None)
        return {
            "id": mid, "type": "message", "role": "assistant", "model": gen.model,
            "content": blocks,
            "stop_reason": stop_reason_of(choice, calls) if choice else None,
            "stop_sequence": choice.stop_sequence if choice else None,
            "usage": {"input_tokens": result.prompt_tokens if result else gen.prompt_tokens,
                      "output_tokens": result.completion_tokens if result else 0},
        }  # fmt: skip

    async def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        """Anthropic's events; an error after the start becomes an `error` event. The text block
        opens with the first text: an answer that may be calls is held back until it is known."""
        is_job = isinstance(source, Generation)
        held = CallStream(offered, bool(forced)) if offered else None
        text_block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        opened = False
        try:
            yield event("message_start", {"message": head(None)})
            async for d in source.deltas() if is_job else replay(source):
                text = held.push(d.text, d.finish_reason is not None)[0] if held else d.text
                if text:
                    if not opened:
                        opened = True
                        yield event("content_block_start", text_block)
                    yield event(
                        "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}}
                    )
            result = source.finish() if is_job else source
            choice = result.choices[0]
            blocks, calls = answer(choice)
            if calls:
                for index, block in enumerate(blocks):
                    yield event(
                        "content_block_start", {"index": index, "content_block": {**block, "input": {}}}
                    )
                    partial = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                    yield event("content_block_delta", {"index": index, "delta": partial})
                    yield event("content_block_stop", {"index": index})
            else:
                if not opened:
                    yield event("content_block_start", text_block)
                yield event("content_block_stop", {"index": 0})
            delta = {"stop_reason": stop_reason_of(choice, calls), "stop_sequence": choice.stop_sequence}
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
