"""POST /v1/responses through the official `openai` client on a real loopback server: the chat
route's answers, the Responses stream events, and bad input as OpenAI's 400s."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from accounts_helpers import build_app, login, make_settings, register
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


def test_previous_response_id_continues_a_callers_own_response(tiny_run: Path, tmp_path: Path):
    with running_server(build_app(make_settings(tmp_path), tiny_run)) as url:
        with httpx.Client(base_url=url) as http:
            register(http, "ana")
            register(http, "bea")
            ana_key = http.post("/v1/keys", headers=login(http, "ana"), json={"name": "agent"}).json()["key"]
            bea = login(http, "bea")
        ana = openai.OpenAI(base_url=url + "/v1", api_key=ana_key, max_retries=0)
        first = ana.responses.create(model="tiny", input="Hola", max_output_tokens=4, temperature=0)
        second = ana.responses.create(
            model="tiny", previous_response_id=first.id, input="Y", max_output_tokens=2, temperature=0
        )
        conversation = [
            *SHORT,
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Y"},
        ]
        chat = ana.chat.completions.create(model="tiny", messages=conversation, max_tokens=2, temperature=0)
        assert second.usage.input_tokens == chat.usage.prompt_tokens
        assert second.output_text == chat.choices[0].message.content
        # ana's account with a login token owns it too; bea does not see it, and nobody an unknown id
        ana_login = openai.OpenAI(
            base_url=url + "/v1",
            api_key="x",
            max_retries=0,
            default_headers=login(httpx.Client(base_url=url), "ana"),
        )
        ana_login.responses.create(
            model="tiny", previous_response_id=second.id, input="Y", max_output_tokens=1
        )
        bea_client = openai.OpenAI(
            base_url=url + "/v1", api_key=bea["Authorization"].split()[1], max_retries=0
        )
        for client, rid in [(bea_client, first.id), (ana, "resp-unknown")]:
            with pytest.raises(openai.NotFoundError) as e:
                client.responses.create(
                    model="tiny", previous_response_id=rid, input="Y", max_output_tokens=1
                )
            assert e.value.body["param"] == "previous_response_id"
        unstored = ana.responses.create(model="tiny", input="Hola", max_output_tokens=1, store=False)
        with pytest.raises(openai.NotFoundError):
            ana.responses.create(
                model="tiny", previous_response_id=unstored.id, input="Y", max_output_tokens=1
            )
