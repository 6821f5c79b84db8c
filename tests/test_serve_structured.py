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

JSON_CHARS = '{}[]":,-0123456789. abcdefghijklmnopqrstuvwxyz'  # the schemas' letters too
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
        ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=32)
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
    settings = ServerSettings(max_slots=16, queue_size=64, data_dir=str(root))
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
