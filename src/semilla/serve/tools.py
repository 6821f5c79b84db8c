"""Tool calling for models that know only system, user and assistant turns.

The declared functions are shown to the model in a system turn; a call is the assistant answering
with a JSON list, `[{"name": "...", "arguments": {...}}]`; a tool's result comes back as a user
turn naming the function. The chat template (tokenizer.CHAT_TEMPLATE) is unchanged, so prompts
stay what fine-tuning saw. With tool_choice "required" or a named function the answer is
constrained (serve/structured.py) to such a list of declared functions with arguments of their
schemas; with "auto" an answer that parses as one is a call, anything else is text.

Every route (OpenAI chat, Anthropic, Ollama, Responses) turns its own shapes into `Tool`s and
`ToolCall`s and uses these functions.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from semilla.serve.errors import APIError
from semilla.serve.structured import OutputFormat, check_schema

ANY_OBJECT = {"type": "object"}
MAX_PARALLEL_CALLS = 4  # calls in one answer: a small model must not loop through a list forever


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict | None = None  # a JSON Schema of the arguments; None: any object


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it

    @staticmethod
    def new(name: str, arguments: dict, id: str | None = None) -> ToolCall:
        return ToolCall(
            id or f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False)
        )

    def openai(self, index: int | None = None) -> dict:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def checked_tools(tools: list[Tool], param: str = "tools") -> list[Tool]:
    """`tools` if their names are unique and their parameters valid JSON Schemas; a 400 naming
    the offending field otherwise."""
    seen = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise APIError(
                400, f"{param}.{i}: function {tool.name!r} is declared twice", param=f"{param}.{i}"
            )
        seen.add(tool.name)
        if tool.parameters is not None:
            check_schema(tool.parameters, f"{param}.{i}.parameters")
    return tools


def forced_tools(tools: list[Tool], choice: str | None, param: str = "tool_choice") -> list[Tool] | None:
    """The functions the answer must call: all of them for 'required', one for a name, None
    (free answer) for 'auto' or 'none'; a 400 for a name no tool has."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        if not tools:
            raise APIError(400, f"{param} 'required' needs at least one tool", param=param)
        return tools
    named = [t for t in tools if t.name == choice]
    if not named:
        declared = ", ".join(t.name for t in tools) or "none"
        raise APIError(400, f"{param} names function {choice!r}, which is not declared (declared: {declared})",
                       param=param)  # fmt: skip
    return named


def call_format(tools: list[Tool], parallel: bool = True) -> OutputFormat:
    """The answer as a JSON list of calls of these functions (one call unless `parallel`, then at
    most MAX_PARALLEL_CALLS)."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters or ANY_OBJECT},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {
        "type": "array",
        "items": items,
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
    }
    return OutputFormat(schema, "tools")


def tools_prompt(tools: list[Tool]) -> str:
    listed = json.dumps(
        [
            {"name": t.name, "description": t.description, "parameters": t.parameters or ANY_OBJECT}
            for t in tools
        ],
        ensure_ascii=False,
    )
    return (
        "You can call these functions: " + listed + "\nTo call them, answer only with a JSON list: "
        '[{"name": "function name", "arguments": {...}}]'
    )


def render_messages(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """Messages with tools, tool calls and tool results as plain {"role", "content"} turns.

    `messages`: {"role", "content"} plus, on assistant turns, "tool_calls" (list of ToolCall),
    and on "tool" turns "name" (the function whose result it is)."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c.name, "arguments": arguments_json(c.arguments)} for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + json.dumps(calls, ensure_ascii=False)
        elif role == "tool":
            role, content = "user", f"Result of {m.get('name') or 'the function'}: {content}"
        out.append({"role": role, "content": content})
    if tools:  # after the caller's system prompt, or as the first turn
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + tools_prompt(tools)
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out


def arguments_json(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def parse_calls(text: str, tools: list[Tool], id_prefix: str | None = None) -> list[ToolCall] | None:
    """The calls an answer makes, or None when it is text (not a JSON list or object of calls
    of declared functions with object arguments). Their ids are `call_<id_prefix>_<i>` (the
    same each time the answer is read), or random."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.name for t in tools}
    calls = []
    for item in items:
        if not (
            isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments"), dict)
        ):
            return None
        call_id = f"call_{id_prefix}_{len(calls)}" if id_prefix else None
        calls.append(ToolCall.new(item["name"], item["arguments"], call_id))
    return calls or None


class CallStream:
    """One streamed answer while it may still be a call: held back until it is known to be
    text (it starts with something other than a JSON list or object) or ends."""

    def __init__(self, tools: list[Tool], forced: bool):
        self.tools, self.forced = tools, forced
        self.held, self.passing = "", False

    def push(self, text: str, last: bool) -> tuple[str, list[ToolCall] | None]:
        """(text to show now, the calls when the answer ended as calls)."""
        if self.passing:
            return text, None
        self.held += text
        head = self.held.lstrip()
        if not last and (self.forced or not head or head[0] in "[{"):
            return "", None
        calls = parse_calls(self.held, self.tools) if last else None
        shown, self.held, self.passing = ("" if calls else self.held), "", True
        return shown, calls
