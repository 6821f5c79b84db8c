"""Ollama's native API, as the official `ollama` client and Open WebUI use it: /api/chat and
/api/generate (NDJSON streaming unless `stream: false`), /api/tags, /api/show, /api/embed and
/api/version, over the same backends, hooks and embedders as the OpenAI routes.

Sampling settings come in `options` (temperature, top_p, top_k, seed, num_predict, stop,
repeat_penalty, min_p...); `format` ("json" or a JSON Schema) constrains the answer, `tools` are
offered as on /v1/chat/completions with tool_choice "auto"; `images` are a 400.
Errors have Ollama's shape, {"error": "..."} (serve/errors.py decides it by path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictStr

from semilla import __version__
from semilla.serve.errors import APIError
from semilla.serve.hooks import Principal
from semilla.serve.protocol import MAX_STOP, SMALLEST, Seed, Temperature, ToolSpec, TopK, TopP
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.routes import embeddings
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
from semilla.serve.tools import CallStream, Tool, ToolCall, checked_tools, parse_calls, render_messages

log = logging.getLogger(__name__)
router = APIRouter(tags=["ollama"])
NDJSON = "application/x-ndjson"


class Options(RequestBody):
    """Ollama's `options`: the sampling ones semilla has; others (num_ctx, mirostat...) are ignored."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    seed: Seed | None = None
    num_predict: int | None = None  # -1 / -2 / absent: up to the server's default, within the context
    stop: Annotated[list[StrictStr], Field(max_length=MAX_STOP)] = Field(default_factory=list)
    repeat_penalty: Annotated[float, Field(ge=SMALLEST, le=10.0)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0


class Unsupported(RequestBody):
    """Fields a text model cannot honour: refused rather than silently ignored."""

    images: list | None = None

    def refuse(self, param: str = "") -> None:
        if self.images:
            raise APIError(400, f"{param}images are not supported by semilla models", param=param + "images")


class FunctionCall(RequestBody):
    name: StrictStr
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(RequestBody):
    function: FunctionCall


class Message(Unsupported):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    tool_calls: list[ToolCallIn] | None = None
    tool_name: StrictStr | None = None  # tool turns: the function whose result this is


class Generating(Unsupported):
    model: StrictStr
    stream: StrictBool = True
    options: Options = Field(default_factory=Options)
    format: Literal["", "json"] | dict[str, Any] = ""  # "json", or a JSON Schema

    def output(self) -> OutputFormat | None:
        if self.format == "json":
            return OutputFormat({}, "format")  # any JSON value
        return OutputFormat(check_schema(self.format, "format"), "format") if self.format else None


class ChatRequest(Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None


class GenerateRequest(Generating):
    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False  # True: the prompt is continued as is, without the chat template
    suffix: StrictStr | None = None


class ModelName(RequestBody):
    model: StrictStr


class EmbedRequest(RequestBody):
    model: StrictStr
    input: StrictStr | list[StrictStr]


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


async def generate_ndjson(
    request: Request,
    principal: Principal,
    body: Generating,
    messages: list[dict] | None,
    prompt: str,
    render,
    tools: list[Tool] | None = None,
):
    """Run the chat (`messages`) or raw completion (`prompt`) and answer as Ollama does: one
    JSON object, or NDJSON lines ending with a `done: true` line of counts. `render(text,
    calls)` is the answer's own part; an answer that parses as calls of `tools` is calls."""
    state, hooks = request.app.state.semilla, request.app.state.hooks
    backend = state.backend(body.model)
    for text in [m["content"] for m in messages] if messages is not None else [prompt]:
        hooks.screen_prompt(principal, text)
    opts = body.options
    asked = opts.num_predict is not None and opts.num_predict > 0
    cfg = sampling_config(opts, opts.num_predict if asked else state.settings.default_max_tokens)
    cfg = dataclasses.replace(cfg, stop=list(opts.stop), repetition_penalty=opts.repeat_penalty)
    call = generation_call(request, principal, cfg, asked, 1, stream=body.stream, param="options.num_predict",
                           prompt_param="messages" if messages is not None else "prompt",
                           output=body.output())  # fmt: skip
    if messages is not None:
        gen, route, source = backend.chat(messages, call), "chat", messages
    else:
        gen, route, source = backend.complete([prompt], call), "completions", [prompt]
    material = material_for(gen, route, source, 1, constraints(call))
    rid = new_id("ollama")

    def final(result: Result) -> dict:
        choice = result.choices[0]
        return {
            "done": True, "done_reason": "length" if choice.finish_reason == "length" else "stop",
            "total_duration": ns(result.elapsed_s), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens, "eval_count": result.completion_tokens,
            "eval_duration": ns(result.elapsed_s),
        }  # fmt: skip

    def whole(result: Result) -> dict:
        text = result.choices[0].text
        calls = parse_calls(text, tools) if tools else None
        return {
            "model": gen.model,
            "created_at": now(),
            **render("" if calls else text, calls),
            **final(result),
        }

    async def render_stream(source: Generation | Result) -> AsyncIterator[str]:
        is_job = isinstance(source, Generation)
        held = CallStream(tools, forced=False) if tools else None
        try:
            async for d in source.deltas() if is_job else replay(source):
                text, calls = held.push(d.text, d.finish_reason is not None) if held else (d.text, None)
                if text or calls:
                    line = {"model": gen.model, "created_at": now(), **render(text, calls), "done": False}
                    yield json.dumps(line, ensure_ascii=False) + "\n"
            result = source.finish() if is_job else source
            yield (
                json.dumps({"model": gen.model, "created_at": now(), **render("", None), **final(result)})
                + "\n"
            )
        except APIError as e:
            yield json.dumps(e.body("ollama")) + "\n"
        except Exception:  # the stream has started: report, never a broken socket
            log.exception("stream failed")
            yield json.dumps({"error": "generation failed"}) + "\n"

    def record(result: Result):
        return result.record(rid, gen.model, route, source, extra={"api": "ollama"})

    return await complete(
        request, principal, gen, material, body.stream, whole, render_stream, record, NDJSON
    )


@router.post("/api/chat", dependencies=JSON_BODY)
async def chat(body: ChatRequest, request: Request):
    """{model, messages, stream, options} -> {"message": {"role": "assistant", "content"}, ...}."""
    principal = await request.app.state.hooks.authorize(request, "models")
    body.refuse()
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    turns = []
    for i, m in enumerate(body.messages):
        m.refuse(f"messages.{i}.")
        turn = {"role": m.role, "content": m.content, "name": m.tool_name}
        if m.tool_calls:
            turn["tool_calls"] = [ToolCall.new(c.function.name, c.function.arguments) for c in m.tool_calls]
        turns.append(turn)
    tools = checked_tools(
        [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    )

    def message(text: str, calls: list[ToolCall] | None) -> dict:
        out = {"role": "assistant", "content": text}
        if calls:  # Ollama's calls carry their arguments as an object
            out["tool_calls"] = [
                {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in calls
            ]
        return {"message": out}

    return await generate_ndjson(request, principal, body, render_messages(turns, tools), "", message, tools)


@router.post("/api/generate", dependencies=JSON_BODY)
async def generate(body: GenerateRequest, request: Request):
    """{model, prompt, system, raw, stream, options} -> {"response", ...}. As in Ollama, the prompt
    goes through the model's chat template (as a user turn after `system`) unless `raw`."""
    principal = await request.app.state.hooks.authorize(request, "models")
    body.refuse()
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by semilla models", param="suffix")
    if not body.prompt:  # Ollama's way to load a model: nothing to generate
        backend = request.app.state.semilla.backend(body.model)
        return {"model": backend.id, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw:
        messages = None
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        messages = [*system, {"role": "user", "content": body.prompt}]
    return await generate_ndjson(
        request, principal, body, messages, body.prompt, lambda text, calls: {"response": text}
    )


def tag(card: dict) -> dict:
    """A model as /api/tags lists it (semilla's card: no files, so no size or digest)."""
    created = datetime.fromtimestamp(card.get("created", 0), UTC).isoformat().replace("+00:00", "Z")
    meta = card.get("meta") or {}
    return {
        "name": card["id"],
        "model": card["id"],
        "modified_at": created,
        "size": 0,
        "digest": "",
        "details": {
            "format": "safetensors" if card.get("owned_by") == "semilla" else "remote",
            "family": meta.get("family") or card.get("owned_by", ""),
            "families": [meta["family"]] if meta.get("family") else None,
            "parameter_size": str(card["parameters"]) if card.get("parameters") else "",
            "quantization_level": "",
        },
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    principal = await request.app.state.hooks.authorize(request, "models")
    return {"models": [tag(card) for card in request.app.state.semilla.cards(principal.role == "admin")]}


@router.post("/api/show", dependencies=JSON_BODY)
async def show(body: ModelName, request: Request) -> dict:
    """A model's details, its context length and what it can do."""
    principal = await request.app.state.hooks.authorize(request, "models")
    backend = request.app.state.semilla.backend(body.model)
    card = tag(backend.card(principal.role == "admin"))
    family = card["details"]["family"] or "semilla"
    info = {"general.architecture": family}
    if backend.context_length is not None:
        info[f"{family}.context_length"] = backend.context_length
    return {"details": card["details"], "model_info": info, "modified_at": card["modified_at"],
            "capabilities": ["completion", "tools"]}  # fmt: skip


@router.post("/api/embed", dependencies=JSON_BODY)
async def embed(body: EmbedRequest, request: Request) -> dict:
    """{model, input} -> {"embeddings": [[...]]}: the embedders of /v1/embeddings (a served
    model or an embedding model)."""
    _, vectors, tokens = await embeddings.embed(request, body.model, body.input)
    return {"model": body.model, "embeddings": vectors.astype(float).tolist(), "prompt_eval_count": tokens}


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}
