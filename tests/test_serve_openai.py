"""The server through the official `openai` client: a real server on a loopback port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_helpers import get_json, running_server

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

HELLO = [{"role": "user", "content": "En un lugar de la Mancha"}]
SHORT = [{"role": "user", "content": "Hola"}]  # fits the tiny model's 32-token context


def random_checkpoint(root: Path, text: str, block_size: int = 1024) -> Path:
    """An untrained char-level model with a long context: slow enough to watch, no training."""
    torch.manual_seed(0)
    tok = Tokenizer.train_char([text])
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)
    )
    return save_checkpoint(root / "long", model, tok)


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory, corpus_text: str):
    long = random_checkpoint(tmp_path_factory.mktemp("long"), corpus_text)
    models = load_models([("tiny", str(tiny_run)), ("long", str(long))])
    settings = ServerSettings(max_slots=4, queue_size=8, data_dir=str(tmp_path_factory.mktemp("data")))
    app = create_app(settings, models)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_are_listed(client: openai.OpenAI):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "long"]
    assert client.models.retrieve("long").id == "long"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completion_shape_and_usage(client: openai.OpenAI, tiny_run: Path):
    import semilla

    r = client.chat.completions.create(model="tiny", messages=SHORT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    lm = semilla.load(str(tiny_run))
    assert r.usage.prompt_tokens == len(lm.chat_ids(SHORT))
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the server's greedy answer is the Python API's greedy answer
    assert choice.message.content == lm.chat(SHORT, max_new_tokens=12, temperature=0)


def test_streamed_text_equals_non_streamed_for_the_same_seed(client: openai.OpenAI):
    kw = dict(model="long", messages=HELLO, max_tokens=40, temperature=1.0, seed=123)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full and len(full) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_logprob_tokens_concatenate_to_the_content(client: openai.OpenAI):
    r = client.chat.completions.create(
        model="long", messages=HELLO, max_tokens=30, temperature=0.7, seed=1, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-6  # the best alternative is at least as likely
        assert t.logprob <= 0


def test_n_choices_and_seed_repeat(client: openai.OpenAI):
    kw = dict(model="long", messages=HELLO, max_tokens=20, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i


def test_stop_strings_cut_the_text(client: openai.OpenAI):
    base = client.chat.completions.create(model="long", messages=HELLO, max_tokens=40, temperature=0)
    text = base.choices[0].message.content
    stop = text[5:7]
    r = client.chat.completions.create(
        model="long", messages=HELLO, max_tokens=40, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_legacy_completions(client: openai.OpenAI):
    r = client.completions.create(
        model="long", prompt=["En un", "Había"], max_tokens=8, temperature=0, echo=True, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("En un") and r.choices[1].text.startswith("Había")
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text  # echo: the prompt's tokens are scored too
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first
    assert len(lp.top_logprobs[1]) == 2
    chunks = list(
        client.completions.create(model="long", prompt="En un", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text[len("En un") :]
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="long", prompt="x", suffix="y", max_tokens=4)


def test_async_client_streams_concurrently(server: str):
    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)

        async def one(seed: int) -> str:
            stream = await client.chat.completions.create(
                model="long", messages=HELLO, max_tokens=30, temperature=1.0, seed=seed, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        together = await asyncio.gather(*(one(s) for s in range(6)))
        alone = [await one(s) for s in range(6)]
        full = await client.chat.completions.create(
            model="long", messages=HELLO, max_tokens=30, temperature=1.0, seed=2
        )
        await client.close()
        return together, alone, full.choices[0].message.content

    together, alone, full = asyncio.run(main())
    assert together == alone  # a sequence's output does not depend on its batch neighbours
    assert together[2] == full


def test_robo_poet_generate_and_simpleia_predict(server: str):
    r = httpx.post(
        server + "/v1/generate", json={"text": "En un", "max_length": 10, "num_samples": 2, "seed": 1}
    )
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success"
    assert len(body["generated_text"]) == 2
    meta = body["metadata"]
    assert meta["model_version"] == "tiny" and meta["tokens_generated"] <= 20 and meta["perplexity"] > 1
    r = httpx.post(server + "/predict", json={"prompt": "En un", "max_length": 10, "model": "long"})
    assert r.status_code == 200 and r.json()["response"] == r.json()["responses"][0]
    with httpx.stream(
        "POST", server + "/predict", json={"prompt": "En", "max_length": 5, "model": "long", "stream": True}
    ) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


def test_health_ready_and_metrics(server: str, client: openai.OpenAI):
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    health = get_json(server + "/health")
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "long"}
    assert get_json(server + "/ready")["status"] == "ready"
    text = httpx.get(server + "/metrics").text
    for name in (
        "semilla_requests_total",
        "semilla_request_latency_seconds_bucket",
        "semilla_time_to_first_token_seconds_bucket",
        "semilla_inter_token_latency_seconds_bucket",
        "semilla_generated_tokens_total",
        "semilla_prompt_tokens_total",
        "semilla_completion_tokens_total",
        "semilla_queue_depth",
        "semilla_active_slots",
    ):
        assert name in text, name
    assert 'route="/v1/chat/completions"' in text
