"""OpenAI's Responses API: POST /v1/responses, as the `openai` client's `responses.create` and
`responses.stream` use it, for text: `input` (a string or messages), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, and the streamed events response.created,
response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done,
response.output_item.done and response.completed (response.incomplete when the answer was
cut by max_output_tokens). `text.format` json_object and json_schema constrain the answer;
function `tools` and `tool_choice` work as on /v1/chat/completions (serve/tools.py): calls come
back as function_call items (streamed with response.function_call_arguments.* events), and
function_call / function_call_output input items carry them back. Unless `store: false`, a
response is kept (its conversation, without instructions, and its answer) so that a later
request from the same caller may continue it with `previous_response_id`; another caller's id
is a 404. They are kept in this process's memory, the newest MAX_STORED.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictStr

from semilla.serve.errors import APIError
from semilla.serve.hooks import Principal
from semilla.serve.protocol import Name, Seed, Temperature, TopP
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.routes.openai import (
    JSON_BODY,
    complete,
    constraints,
    generation_call,
    material_for,
    replay,
)
from semilla.serve.serving import Generation, Result, new_id, sampling_config
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
router = APIRouter(tags=["openai"])


class InputPart(RequestBody):
    type: StrictStr  # input_text and output_text are text; the others are a 400 naming them
    text: StrictStr | None = None


class InputItem(RequestBody):
    type: StrictStr = "message"  # or function_call, function_call_output
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: StrictStr | list[InputPart] = ""
    call_id: StrictStr | None = None  # function_call and function_call_output
    name: StrictStr | None = None  # function_call
    arguments: StrictStr = "{}"  # function_call
    output: StrictStr = ""  # function_call_output


class TextFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Name | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    def output(self) -> OutputFormat | None:
        if self.type == "json_object":
            return OutputFormat({"type": "object"}, "text.format")
        if self.type == "json_schema":
            return OutputFormat(check_schema(self.schema_, "text.format.schema"), "text.format.schema")
        return None


class FunctionTool(RequestBody):
    type: Literal["function"]
    name: Name
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(RequestBody):
    type: Literal["function"]
    name: StrictStr


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
    store: StrictBool = True
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool = True
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


MAX_STORED = 10_000


class StoredResponses:
    """Responses that previous_response_id may continue: each one's turns (serve/tools.py's
    shape, without instructions) by id, with the caller that owns it; the newest MAX_STORED."""

    def __init__(self, limit: int = MAX_STORED):
        self.limit, self.items = limit, OrderedDict()
        self.lock = threading.Lock()

    def put(self, rid: str, owner: str, turns: list[dict]) -> None:
        with self.lock:
            self.items[rid] = (owner, turns)
            while len(self.items) > self.limit:
                self.items.popitem(last=False)

    def turns(self, rid: str, owner: str) -> list[dict]:
        """The stored turns; a 404 when there is no such response of this caller's."""
        with self.lock:
            found = self.items.get(rid)
        if found is None or found[0] != owner:
            raise APIError(
                404, f"no response {rid!r} to continue", param="previous_response_id", code="not_found"
            )
        return list(found[1])


def owner_of(principal: Principal) -> str:
    """Whose a stored response is: the account (all its keys), else the key, else anonymous."""
    return f"user:{principal.user_id}" if principal.user_id is not None else principal.scope


def chat_messages(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The conversation as turns (serve/tools.py's shape): the earlier response's `history`,
    then the input (function_call items join an assistant turn's tool_calls, function_call_output
    items are tool turns naming their function). Without the instructions (see create_response)."""
    messages = list(history)
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    names = {c.id: c.name for m in history for c in m.get("tool_calls", [])}
    for i, item in enumerate(body.input):
        if item.type == "function_call":
            if item.call_id is None or item.name is None:
                raise APIError(400, f"input.{i}: a function_call needs call_id and name", param=f"input.{i}")
            names[item.call_id] = item.name
            call = ToolCall(item.call_id, item.name, item.arguments)
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "content": item.output, "name": names.get(item.call_id or "")})
        else:
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item_text(item, i)})
    return messages


def response_tools(body: ResponsesRequest) -> tuple[list[Tool], list[Tool] | None]:
    """The tools shown to the model (none for tool_choice 'none') and those it must call."""
    declared = [Tool(t.name, t.description or "", t.parameters) for t in body.tools or []]
    choice = body.tool_choice.name if isinstance(body.tool_choice, NamedFunction) else body.tool_choice
    if choice is not None and choice != "none" and not declared:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    tools = checked_tools(declared)
    return ([] if choice == "none" else tools), forced_tools(tools, choice)


@router.post("/v1/responses", dependencies=JSON_BODY)
async def create_response(body: ResponsesRequest, request: Request):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    stored: StoredResponses = request.app.state.responses
    history = (
        stored.turns(body.previous_response_id, owner_of(principal)) if body.previous_response_id else []
    )
    turns = chat_messages(body, history)
    offered, forced = response_tools(body)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = render_messages(system + turns, offered)
    if len(messages) > state.settings.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} (at most {state.settings.max_messages})",
                       param="input")  # fmt: skip
    for m in messages:
        hooks.screen_prompt(principal, m["content"])
    asked = body.max_output_tokens
    cfg = sampling_config(body, asked or state.settings.default_max_tokens)
    output = (
        call_format(forced, body.parallel_tool_calls) if forced else body.text and body.text.format.output()
    )
    call = generation_call(request, principal, cfg, asked is not None, 1, stream=body.stream,
                           param="max_output_tokens", prompt_param="input", output=output)  # fmt: skip
    gen = backend.chat(messages, call)
    material = material_for(gen, "chat", messages, 1, constraints(call))
    rid, item_id, created = new_id("resp"), new_id("msg"), int(time.time())
    call_prefix = rid.removeprefix("resp-")  # a call's id is the same however often it is read
    tools = [t.model_dump(by_alias=True) for t in body.tools or []]
    tool_choice = (
        body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction) else body.tool_choice
    )
    text_format = (
        body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text else {"type": "text"}
    )

    def message(text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [part] if status == "completed" else []}  # fmt: skip

    def function_call(call: ToolCall, status: str) -> dict:
        return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                "name": call.name, "arguments": call.arguments if status == "completed" else "",
                "status": status}  # fmt: skip

    def outputs(result: Result) -> list[dict]:
        text = result.choices[0].text
        calls = parse_calls(text, offered, call_prefix) if offered else None
        return [function_call(c, "completed") for c in calls] if calls else [message(text, "completed")]

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
            "output": outputs(result) if result else [],
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": tool_choice, "tools": tools, "text": text_format, "truncation": "disabled",
            "usage": usage, "metadata": {}, "store": body.store,
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
        held = CallStream(offered, bool(forced)) if offered else None
        opened = False  # the message item is announced with its first text: an answer may be calls

        def open_message() -> Iterator[str]:
            nonlocal opened
            if not opened:
                opened = True
                yield event("response.output_item.added", output_index=0, item=message("", "in_progress"))
                empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield event("response.content_part.added", **where, part=empty)

        try:
            yield event("response.created", response=response(None))
            yield event("response.in_progress", response=response(None))
            async for d in source.deltas() if is_job else replay(source):
                text = held.push(d.text, d.finish_reason is not None)[0] if held else d.text
                if text:
                    for e in open_message():
                        yield e
                    yield event("response.output_text.delta", **where, delta=text, logprobs=[])
            result = source.finish() if is_job else source
            final = response(result)
            for index, item in enumerate(final["output"]):
                if item["type"] == "function_call":
                    at = {"item_id": item["id"], "output_index": index}
                    yield event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                "status": "in_progress"})  # fmt: skip
                    yield event("response.function_call_arguments.delta", **at, delta=item["arguments"])
                    yield event("response.function_call_arguments.done", **at, arguments=item["arguments"])
                    yield event("response.output_item.done", output_index=index, item=item)
                    continue
                for e in open_message():
                    yield e
                yield event(
                    "response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[]
                )
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
        if body.store:
            text = result.choices[0].text
            calls = parse_calls(text, offered, call_prefix) if offered else None
            answer = {
                "role": "assistant",
                "content": "" if calls else text,
                **({"tool_calls": calls} if calls else {}),
            }
            stored.put(rid, owner_of(principal), [*turns, answer])
        extra = {"api": "responses", **({"user": body.user} if body.user else {})}
        return result.record(rid, gen.model, "chat", messages, extra=extra)

    return await complete(request, principal, gen, material, body.stream, response, render_stream, record)
