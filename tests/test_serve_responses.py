"""POST /v1/responses through the official `openai` client on a real loopback server: the chat
route's answers, the Responses stream events, and bad input as OpenAI's 400s."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from accounts_helpers import build_app, make_settings
from server_helpers import running_server

SHORT = [{"role": "user", "content": "Hola"}]  # the tiny model's context is 32 tokens


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory):
    with running_server(build_app(make_settings(tmp_path_factory.mktemp("responses")), tiny_run)) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_create_equals_the_chat_route(client: openai.OpenAI):
    ref = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Breve."}, *SHORT], max_tokens=8, temperature=0
    )
    r = client.responses.create(
        model="tiny", input="Hola", instructions="Breve.", max_output_tokens=8, temperature=0
    )
    assert r.object == "response" and r.model == "tiny" and r.id.startswith("resp-")
    assert r.output_text == ref.choices[0].message.content and r.output_text
    assert r.status == ("incomplete" if ref.choices[0].finish_reason == "length" else "completed")
    assert (
        r.usage.input_tokens == ref.usage.prompt_tokens
        and r.usage.output_tokens == ref.usage.completion_tokens
    )
    parts = [{"role": "system", "content": [{"type": "input_text", "text": "Breve."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Ho"}, {"type": "input_text", "text": "la"}]}]  # fmt: skip
    again = client.responses.create(model="tiny", input=parts, max_output_tokens=8, temperature=0)
    assert again.output_text == r.output_text


def test_stream_events(client: openai.OpenAI):
    whole = client.responses.create(model="tiny", input="Hola", max_output_tokens=8, temperature=0)
    events = list(
        client.responses.create(model="tiny", input="Hola", max_output_tokens=8, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    end = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        end,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    # a short stop: the stream helper's final response needs response.completed
    with client.responses.stream(model="tiny", input="Hola", max_output_tokens=8, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        if whole.status == "completed":
            assert stream.get_final_response().output_text == text
    assert text == whole.output_text


def test_bad_requests_are_openai_400s(client: openai.OpenAI, server: str):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hola")
    for kw, naming in [
        ({"previous_response_id": "resp-1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]}, "tools.0.parameters"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}},
            "text.format.schema",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input_image",
        ),
        (
            {"input": [{"type": "function_call", "arguments": "{}"}]},
            "function_call needs call_id and name",
        ),
        ({"max_output_tokens": 500}, "max_output_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": "tiny", "input": "Hola", **kw})
        assert naming in e.value.message, e.value.message
    r = httpx.post(server + "/v1/responses", content=b"hola", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
