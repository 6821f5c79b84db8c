"""Structured output through the official `openai` client: response_format (JSON object, JSON
schema) by constrained decoding in the batching engine, and logit_bias."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from server_helpers import running_server

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

JSON_CHARS = '{}[]":,-_0123456789. abcdefghijklmnopqrstuvwxyz'  # the schemas' letters too
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def random_checkpoint(root: Path, tok: Tokenizer, seed: int = 0) -> Path:
    """An untrained model (random answers: the grammar alone makes them JSON)."""
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=2, n_head=2, n_embd=32)
    )
    return save_checkpoint(root / tok.kind, model, tok)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus_text: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structured")
    text = corpus_text + JSON_CHARS
    return {
        "char": random_checkpoint(root, Tokenizer.train_char([text])),
        "bpe": random_checkpoint(root, Tokenizer.train_bpe([text], vocab_size=400)),
    }


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path], tmp_path_factory):
    models = load_models([(name, str(path)) for name, path in checkpoints.items()])
    root = tmp_path_factory.mktemp("data")
    many = {"anonymous": 10**6, "user": 10**6, "admin": 10**6}  # hundreds of requests a minute here
    settings = ServerSettings(
        max_slots=16, queue_size=64, data_dir=str(root), rate_limit_rpm=many, rate_limit_tpm=many
    )
    with running_server(create_app(settings, models)) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_200_answers_to_a_json_schema_all_parse_and_validate(client: openai.OpenAI):
    """Random models, sampled at temperature 1: every answer is valid JSON of the schema."""

    def ask(i: int) -> list[str]:
        r = client.chat.completions.create(
            model="char" if i % 5 else "bpe",
            messages=[{"role": "user", "content": f"persona {i}"}],
            response_format=schema_format(PERSON),
            max_tokens=200,
            n=4,
            seed=100 * i,  # the n choices take seeds seed..seed+3
        )
        assert all(c.finish_reason == "stop" for c in r.choices)
        return [c.message.content for c in r.choices]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(ask, range(50)) for a in batch]
    assert len(answers) == 200
    validator = jsonschema.Draft202012Validator(PERSON)
    for answer in answers:
        validator.validate(json.loads(answer))
    assert len(set(answers)) > 100  # sampled, not one forced answer


def test_json_object_streamed_and_whole(client: openai.OpenAI):
    kw = dict(model="char", messages=[{"role": "user", "content": "hola"}], max_tokens=300, seed=7)
    kw["response_format"] = {"type": "json_object"}
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop" and isinstance(json.loads(whole.message.content), dict)
    chunks = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content


def test_a_constrained_row_leaves_the_others_of_its_batch_alone(client: openai.OpenAI):
    """The mask is per row: a free answer sampled beside constrained ones equals it sampled alone."""
    free = dict(model="char", messages=[{"role": "user", "content": "En un lugar"}], max_tokens=60, seed=3)
    create = client.chat.completions.create
    # top_k above the vocabulary keeps every token; a new value each time: never a cached answer
    alone = create(**free, extra_body={"top_k": 1000}).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        constrained = [
            pool.submit(create, **free, response_format=schema_format(PERSON), extra_body={"top_k": 999})
            for _ in range(3)
        ]
        beside = pool.submit(create, **free, extra_body={"top_k": 998})
        assert beside.result().choices[0].message.content == alone
        for c in constrained:
            jsonschema.validate(json.loads(c.result().choices[0].message.content), PERSON)
    assert not alone.startswith("{")


def test_recursive_schemas_are_enforced(client: openai.OpenAI):
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    }
    r = client.chat.completions.create(
        model="bpe", messages=[{"role": "user", "content": "x"}], response_format=schema_format(tree),
        max_tokens=400, temperature=0,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), tree)
    else:  # cut by max_tokens: still a prefix the grammar took
        assert r.choices[0].message.content.startswith('{"v": ')


@pytest.mark.parametrize(
    "response_format, needle",
    [
        (schema_format({"type": "strin"}), "not a valid JSON Schema"),
        (schema_format({"type": "string", "pattern": "(?=a)b"}), "look-around"),
        (schema_format({"type": "string", "format": "telefono"}), "Unknown format"),
        ({"type": "json_schema"}, "json_schema is required"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_400_naming_the_field(client, response_format, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="char", messages=[{"role": "user", "content": "x"}], response_format=response_format
        )
    assert needle in e.value.message and e.value.body["param"].startswith("response_format")


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, checkpoints: dict[str, Path]):
    tok = Tokenizer.load(checkpoints["char"])
    kw = dict(model="char", prompt="En un lugar", max_tokens=8, temperature=0)
    forced = client.completions.create(**kw, logit_bias={str(tok.token_to_id("x")): 100})
    assert forced.choices[0].text == "x" * 8
    plain = client.completions.create(**kw).choices[0].text
    assert plain
    banned = client.completions.create(**kw, logit_bias={str(tok.encode(plain)[0]): -100}).choices[0].text
    assert banned[:1] != plain[:1]
    chat = client.chat.completions.create(
        model="char", messages=[{"role": "user", "content": "hola"}], max_tokens=5, temperature=0,
        logit_bias={str(tok.token_to_id("y")): 100},
    )  # fmt: skip
    assert chat.choices[0].message.content == "yyyyy"


@pytest.mark.parametrize(
    "bias, needle",
    [
        ({str(i): 1 for i in range(301)}, "at most 300"),
        ({"5": 101}, "less than or equal to 100"),
        ({"5": -100.5}, "greater than or equal to -100"),
        ({"99999": 1}, "not a token id"),
        ({"x": 1}, "not a token id"),
    ],
)
def test_bad_logit_bias_is_400_naming_it(server: str, bias: dict, needle: str):
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": "char", "messages": [{"role": "user", "content": "x"}], "logit_bias": bias},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"].startswith("logit_bias")


# --- tools -------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Madrid", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "¿Qué tiempo hace?"}]


def test_200_required_tool_calls_are_all_valid_calls(client: openai.OpenAI):
    def ask(i: int) -> list:
        r = client.chat.completions.create(
            model="char" if i % 5 else "bpe", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=600, n=4, seed=100 * i,
        )  # fmt: skip
        assert all(c.finish_reason == "tool_calls" and c.message.content is None for c in r.choices), [
            (c.finish_reason, (c.message.content or "")[-200:]) for c in r.choices
        ]
        return [call for c in r.choices for call in c.message.tool_calls]

    with ThreadPoolExecutor(8) as pool:
        calls = [call for batch in pool.map(ask, range(50)) for call in batch]
    assert len(calls) >= 200
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert {call.function.name for call in calls} == {"get_weather", "get_time"}


def test_a_named_function_is_the_one_called_once_without_parallel_calls(client: openai.OpenAI):
    r = client.chat.completions.create(
        model="char", messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False, n=4, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=200,
    )  # fmt: skip
    for c in r.choices:
        assert len(c.message.tool_calls) == 1 and c.message.tool_calls[0].function.name == "get_time"


def test_streamed_tool_calls_equal_the_whole_answer(client: openai.OpenAI):
    kw = dict(model="char", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200, seed=5)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (w.function.name, w.function.arguments) for w in whole
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tool_calls_and_results_are_rendered_into_the_prompt(
    client: openai.OpenAI, checkpoints: dict[str, Path]
):
    from semilla.serve.tools import Tool, tools_prompt

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Lima", "days": 2}'},
    }
    messages = [
        {"role": "system", "content": "Breve."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    r = client.chat.completions.create(
        model="char", messages=messages, tools=[WEATHER], max_tokens=4, temperature=0
    )
    tool = Tool("get_weather", "The weather in a city", WEATHER["function"]["parameters"])
    expected = [
        {"role": "system", "content": "Breve.\n\n" + tools_prompt([tool])},
        *ASK,
        {
            "role": "assistant",
            "content": '[{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}]',
        },
        {"role": "user", "content": "Result of get_weather: 18 C"},
    ]
    tok = Tokenizer.load(checkpoints["char"])
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(expected))


def test_auto_answers_are_calls_only_when_they_parse_as_calls():
    from semilla.serve.tools import CallStream, Tool, parse_calls

    tools = [Tool("f", parameters={"type": "object"})]
    calls = parse_calls('[{"name": "f", "arguments": {"x": 1}}]', tools)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    assert parse_calls('{"name": "f", "arguments": {}}', tools)[0].name == "f"
    for text in ["hola", '[{"name": "g", "arguments": {}}]', '[{"name": "f", "arguments": 3}]', "[]", "{"]:
        assert parse_calls(text, tools) is None
    stream = CallStream(tools, forced=False)
    assert stream.push("  ", False) == ("", None)  # may still become a call
    assert stream.push("hola", False) == ("  hola", None)  # text: shown from here on
    assert stream.push(" mundo", True) == (" mundo", None)
    stream = CallStream(tools, forced=False)
    assert stream.push('[{"name": "f", ', False) == ("", None)
    shown, calls = stream.push('"arguments": {}}]', True)
    assert shown == "" and calls[0].name == "f"


@pytest.mark.parametrize(
    "extra, param, needle",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not declared",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools.0.parameters",
            "not a valid JSON Schema",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools.1", "declared twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
            "pattern",
        ),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages.0.tool_call_id", "required"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            },
            "messages.0.content.0.type",
            "'image_url' are not supported",
        ),
    ],
)
def test_bad_tools_are_400_naming_the_field(server: str, extra: dict, param: str, needle: str):
    body = {"model": "char", "messages": ASK, **extra}
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param, error


# --- the same through Ollama's, Anthropic's and the Responses API --------------------------


def test_ollama_format_and_tools(server: str):
    import ollama

    client = ollama.Client(host=server)
    r = client.chat(model="char", messages=ASK, format=PERSON, options={"seed": 1, "num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), PERSON)
    r = client.generate(model="bpe", prompt="x", format="json", options={"seed": 2, "num_predict": 300})
    json.loads(r.response)
    streamed = "".join(
        part.message.content
        for part in client.chat(
            model="char", messages=ASK, format=PERSON, stream=True, options={"seed": 1, "num_predict": 200}
        )
    )
    jsonschema.validate(json.loads(streamed), PERSON)
    r = client.chat(model="char", messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 8})
    assert r.message.content and not r.message.tool_calls  # "auto": a random model answers text
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}}],
        },
        {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
    ]
    # raw JSON: the ollama client's Tool model drops schema keywords it does not know (minimum, ...)
    body = {"model": "char", "messages": history, "tools": [WEATHER], "stream": False}
    r = httpx.post(server + "/api/chat", json=body | {"options": {"temperature": 0, "num_predict": 4}}).json()
    oa = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    same = oa.chat.completions.create(
        model="char", max_tokens=4, temperature=0, tools=[WEATHER],
        messages=[*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima", "days": 2}'}}]},
                  {"role": "tool", "tool_call_id": "c", "content": "18 C"}],
    )  # fmt: skip
    assert r["prompt_eval_count"] == same.usage.prompt_tokens
    assert r["message"]["content"] == same.choices[0].message.content


def test_responses_text_format_and_function_calls(client: openai.OpenAI):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    r = client.responses.create(
        model="char", input="persona", text=fmt, max_output_tokens=200, extra_body={"seed": 4}
    )
    jsonschema.validate(json.loads(r.output_text), PERSON)
    tool = {
        "type": "function",
        **WEATHER["function"],
        "strict": True,
    }
    kw = dict(
        model="char",
        input=ASK,
        tools=[tool],
        tool_choice="required",
        max_output_tokens=300,
        extra_body={"seed": 4},
    )
    r = client.responses.create(**kw)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and len(calls) == len(r.output)
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [c.arguments for c in calls] == [c.arguments for c in final.output]
    assert not any(e.type == "response.output_text.delta" for e in events)
    # the call and its output go back as input items, rendered as the chat route renders them
    back = [*ASK, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Lima", "days": 2}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18 C"}]  # fmt: skip
    again = client.responses.create(
        model="char", input=back, tools=[tool], max_output_tokens=4, temperature=0
    )
    chat = client.chat.completions.create(
        model="char", max_tokens=4, temperature=0, tools=[WEATHER],
        messages=[*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima", "days": 2}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "18 C"}],
    )  # fmt: skip
    assert (
        again.usage.input_tokens == chat.usage.prompt_tokens
        and again.output_text == chat.choices[0].message.content
    )


def test_anthropic_tool_use_and_output_format(server: str, client: openai.OpenAI):
    import anthropic

    claude = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    tool = {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": SCHEMAS["get_weather"],
    }
    kw = dict(model="char", messages=ASK, tools=[tool], tool_choice={"type": "any"}, max_tokens=300)
    r = claude.messages.create(**kw)
    assert r.stop_reason == "tool_use" and r.content
    for block in r.content:
        assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
        jsonschema.validate(block.input, SCHEMAS["get_weather"])
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and all(b.type == "tool_use" for b in final.content)
    for block in final.content:
        jsonschema.validate(block.input, SCHEMAS["get_weather"])
    one = claude.messages.create(
        **kw | {"tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}}
    )
    assert len(one.content) == 1
    # a tool_use and its tool_result go back, rendered as the chat route renders them
    back = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Lima", "days": 2}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18 C"}]}]  # fmt: skip
    again = claude.messages.create(
        model="char", messages=back, tools=[tool], max_tokens=4, extra_body={"temperature": 0}
    )
    chat = client.chat.completions.create(
        model="char", max_tokens=4, temperature=0, tools=[WEATHER],
        messages=[*ASK, {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima", "days": 2}'}}]},
                  {"role": "tool", "tool_call_id": "t1", "content": "18 C"}],
    )  # fmt: skip
    assert (
        again.usage.input_tokens == chat.usage.prompt_tokens
        and again.content[0].text == chat.choices[0].message.content
    )
    r = httpx.post(
        server + "/v1/messages",
        json={"model": "char", "messages": ASK, "max_tokens": 200, "output_config": {"format": {"type": "json_schema", "schema": PERSON}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.json()["content"][0]["text"]), PERSON)
    for body, needle in [
        ({"tools": [tool], "tool_choice": {"type": "tool", "name": "nope"}}, "not declared"),
        ({"output_format": {"type": "json_schema", "schema": {"type": "strin"}}}, "output_format.schema"),
        ({"tools": [{**tool, "input_schema": {"type": 5}}]}, "tools.0.parameters"),
    ]:
        r = httpx.post(
            server + "/v1/messages", json={"model": "char", "messages": ASK, "max_tokens": 10, **body}
        )
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_tool_choice_none_hides_the_tools(client: openai.OpenAI):
    kw = dict(model="char", messages=ASK, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kw)
    none = client.chat.completions.create(**kw, tools=[WEATHER], tool_choice="none")
    offered = client.chat.completions.create(**kw, tools=[WEATHER])
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None
