"""The accounts layer behind the real model routes: keys on chat, the response cache, token and
request limits with real generation, feedback and conversations on real completion ids.

One real server (create_app + the tiny trained model) on loopback with a real SQLite store.
"""

from __future__ import annotations

import json
import re
import statistics
import time

import httpx
import openai
import pytest
from accounts_helpers import build_app, chat, login, make_settings, register, serve

from semilla.cli import main

HOLA = [{"role": "user", "content": "Hola"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("serving")
    settings = make_settings(tmp)
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for name in ("root", "ana", "bob"):  # root is the first account: admin
            register(c, name)
        tokens = {name: login(c, name) for name in ("root", "ana", "bob")}
        c.cookies.clear()
        c.tokens, c.data_dir, c.url = tokens, tmp / "data", url
        yield c


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def cache_stats(c: httpx.Client) -> dict:
    return c.get("/admin/cache", headers=c.tokens["root"]).json()


def metric(c: httpx.Client, name: str) -> float:
    text = c.get("/metrics", headers=c.tokens["root"]).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def sse_events(r: httpx.Response) -> list:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


# --- credentials on the model routes -------------------------------------------------------


def test_api_keys_work_on_chat_as_bearer_x_api_key_and_through_the_openai_client(world):
    c = world
    key = c.post("/v1/keys", headers=c.tokens["ana"], json={"name": "app"}).json()["key"]
    assert content(chat(c, {"Authorization": f"Bearer {key}"}))
    assert content(chat(c, {"X-API-Key": key}))
    client = openai.OpenAI(base_url=c.url + "/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=HOLA, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == content(chat(c, {"X-API-Key": key}))
    stream = client.chat.completions.create(  # min_tokens: a sampled <eos> cannot end it at once
        model="tiny", messages=HOLA, max_tokens=4, temperature=0.9, stream=True, extra_body={"min_tokens": 4}
    )
    assert len(list(stream)) >= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=c.url + "/v1", api_key="sk-" + "B" * 43, max_retries=0).models.list()
    # a key without the 'models' scope reaches feedback but not the models
    narrow = c.post("/v1/keys", headers=c.tokens["ana"], json={"name": "fb", "scopes": ["feedback"]}).json()
    r = chat(c, {"X-API-Key": narrow["key"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert c.get("/feedback", headers={"X-API-Key": narrow["key"]}).status_code == 200


# --- the response cache through the real chat route ----------------------------------------


def test_a_deterministic_chat_is_answered_from_the_cache(world):
    c, ana = world, world.tokens["ana"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 16,
            "temperature": 0}  # fmt: skip
    before, hits_metric = cache_stats(c), metric(c, "semilla_cache_hits_total")
    started = time.perf_counter()
    first = c.post("/v1/chat/completions", headers=ana, json=body).json()
    miss_s = time.perf_counter() - started
    hit_times = []
    for _ in range(10):
        started = time.perf_counter()
        again = c.post("/v1/chat/completions", headers=ana, json=body).json()
        hit_times.append(time.perf_counter() - started)
        assert again["id"] != first["id"]
        assert {k: v for k, v in again.items() if k not in ("id", "created")} == {
            k: v for k, v in first.items() if k not in ("id", "created")
        }
    after = cache_stats(c)
    assert after["hits"] - before["hits"] == 10 and after["misses"] - before["misses"] == 1
    assert after["entries"] == before["entries"] + 1
    assert metric(c, "semilla_cache_hits_total") - hits_metric == 10
    hit_s = statistics.median(hit_times)
    print(f"cache: miss {1000 * miss_s:.1f} ms, hit median {1000 * hit_s:.1f} ms over loopback HTTP")
    assert hit_s < 0.1  # generation is skipped: the hit costs an HTTP round trip, no model step

    # a seed makes a sampled request deterministic: cached too, and it differs from greedy
    seeded = body | {"temperature": 1.0, "seed": 7}
    text = content(c.post("/v1/chat/completions", headers=ana, json=seeded))
    hits = cache_stats(c)["hits"]
    assert content(c.post("/v1/chat/completions", headers=ana, json=seeded)) == text
    assert cache_stats(c)["hits"] == hits + 1
    # any change of a generation parameter is another entry
    content(c.post("/v1/chat/completions", headers=ana, json=seeded | {"seed": 8}))
    assert cache_stats(c)["hits"] == hits + 1


def test_a_streamed_deterministic_request_replays_from_the_cache(world):
    c, ana = world, world.tokens["ana"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "stream me"}], "max_tokens": 12,
            "temperature": 0}  # fmt: skip
    full = content(c.post("/v1/chat/completions", headers=ana, json=body))
    hits = cache_stats(c)["hits"]
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(c.post("/v1/chat/completions", headers=ana, json=body | opts))
    assert cache_stats(c)["hits"] == hits + 1
    assert streamed_text(events) == full
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and len({e["id"] for e in events}) == 1
    assert events[-1]["usage"]["completion_tokens"] == 12 and events[-1]["choices"] == []
    # the other way round: a streamed miss fills the cache for the plain request
    other = body | {"messages": [{"role": "user", "content": "stream first"}]}
    streamed = streamed_text(sse_events(c.post("/v1/chat/completions", headers=ana, json=other | opts)))
    hits = cache_stats(c)["hits"]
    assert content(c.post("/v1/chat/completions", headers=ana, json=other)) == streamed
    assert cache_stats(c)["hits"] == hits + 1


def test_sampled_requests_without_a_seed_are_never_cached(world):
    c, ana = world, world.tokens["ana"]
    before = cache_stats(c)
    for _ in range(3):
        content(chat(c, ana, "Hola", temperature=1.0, max_tokens=8))
        sse_events(chat(c, ana, "Hola", temperature=0.7, max_tokens=8, stream=True))
    after = cache_stats(c)
    assert (after["hits"], after["misses"], after["entries"]) == (
        before["hits"], before["misses"], before["entries"],
    )  # fmt: skip


def test_two_users_with_identical_prompts_never_share_an_entry(world):
    c = world
    before = cache_stats(c)
    ana = content(chat(c, c.tokens["ana"], "same words"))
    bob = content(chat(c, c.tokens["bob"], "same words"))
    after = cache_stats(c)
    assert ana == bob  # the same greedy answer, computed twice
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"] + 2
    assert after["entries"] == before["entries"] + 2
    assert content(chat(c, c.tokens["bob"], "same words")) == bob
    assert cache_stats(c)["hits"] == before["hits"] + 1


# --- feedback and conversations on real completions ----------------------------------------


def test_feedback_on_real_completions_exports_as_a_chat_dataset(world, tmp_path, capsys):
    c, ana = world, world.tokens["ana"]
    messages = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "Hola"}]
    r = chat(c, ana, messages=messages, max_tokens=6)
    answer, cid = content(r), r.json()["id"]
    hit = chat(c, ana, messages=messages, max_tokens=6).json()  # from the cache, with an id of its own
    assert hit["id"] != cid
    assert c.post("/feedback", headers=ana, json={"completion_id": cid, "rating": 1, "text": "<b>bien</b>"}).status_code == 201  # fmt: skip
    assert (
        c.post("/feedback", headers=ana, json={"completion_id": hit["id"], "rating": -1}).status_code == 201
    )
    assert (
        c.post("/feedback", headers=c.tokens["bob"], json={"completion_id": cid, "rating": 5}).status_code
        == 404
    )
    out = tmp_path / "feedback.jsonl"
    assert main(["admin", "--data-dir", str(c.data_dir), "feedback", "export", str(out)]) == 0
    rows = {row["completion_id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows[cid] == {"messages": [*messages, {"role": "assistant", "content": answer}], "rating": 1,
                         "scale": "thumbs", "positive": True, "feedback": "<b>bien</b>", "model": "tiny", "completion_id": cid}  # fmt: skip
    assert rows[hit["id"]]["rating"] == -1 and rows[hit["id"]]["messages"][-1]["content"] == answer
    capsys.readouterr()


def test_conversation_history_from_real_chat_requests_stays_private(world):
    c, ana, bob = world, world.tokens["ana"], world.tokens["bob"]
    conv = c.post("/v1/conversations", headers=ana, json={}).json()["id"]
    first = content(chat(c, ana, "Hola", conversation_id=conv))
    streamed = streamed_text(sse_events(chat(c, ana, "¿Qué tal?", conversation_id=conv, stream=True)))
    assert content(chat(c, bob, "intruso", conversation_id=conv))  # answered, but not written to ana's
    got = c.get(f"/v1/conversations/{conv}", headers=ana).json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "Hola"), ("assistant", first), ("user", "¿Qué tal?"), ("assistant", streamed),
    ]  # fmt: skip
    assert all(m["completion_id"] for m in got["messages"] if m["role"] == "assistant")
    assert c.get(f"/v1/conversations/{conv}", headers=bob).status_code == 404
    assert conv not in json.dumps(c.get("/v1/conversations", headers=bob).json())
    # a cached answer in a second conversation still becomes a turn of it
    other = c.post("/v1/conversations", headers=ana, json={}).json()["id"]
    assert content(chat(c, ana, "Hola", conversation_id=other)) == first
    turns = c.get(f"/v1/conversations/{other}", headers=ana).json()["messages"]
    assert [m["content"] for m in turns] == ["Hola", first]


def test_regenerating_replaces_the_last_answer_and_asking_again_adds_a_turn(world):
    c, ana = world, world.tokens["ana"]
    conv = c.post("/v1/conversations", headers=ana, json={}).json()["id"]
    first = content(chat(c, ana, "Hola", conversation_id=conv))
    # the web UI's regenerate: the same question again, without the answer it replaces
    again = content(chat(c, ana, "Hola", conversation_id=conv, temperature=1.0, seed=3))
    turns = [
        (m["role"], m["content"]) for m in c.get(f"/v1/conversations/{conv}", headers=ana).json()["messages"]
    ]
    assert turns == [("user", "Hola"), ("assistant", again)]
    # the same question asked after the answer (history sent along) is a new turn
    history = [
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": again},
        {"role": "user", "content": "Hola"},
    ]
    r = c.post("/v1/chat/completions", headers=ana, json={"model": "tiny", "messages": history,
               "max_tokens": 2, "temperature": 0, "conversation_id": conv})  # fmt: skip
    assert r.status_code == 200 and first
    turns = c.get(f"/v1/conversations/{conv}", headers=ana).json()["messages"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]


def test_hostile_text_in_chat_is_data(world):
    c, ana = world, world.tokens["ana"]
    conv = c.post("/v1/conversations", headers=ana, json={}).json()["id"]
    for text in ("<b onmouseover=x>", "'; DROP TABLE x;--", '" OR 1=1'):
        r = chat(c, ana, text, conversation_id=conv, user=text)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    users = [m["content"] for m in c.get(f"/v1/conversations/{conv}", headers=ana).json()["messages"][::2]]
    assert users == ["<b onmouseover=x>", "'; DROP TABLE x;--", '" OR 1=1']


# --- limits with real generation -----------------------------------------------------------


def test_a_client_that_leaves_mid_stream_is_charged_for_what_was_generated(tmp_path, tiny_run):
    settings = make_settings(tmp_path, rate_limit_tpm={"user": 5, "admin": 5, "anonymous": 5})
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url, timeout=60) as c:
        register(c, "root")
        register(c, "ana")
        ana = login(c, "ana")
        c.cookies.clear()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hola"}], "max_tokens": 24,
                "min_tokens": 24, "temperature": 1.0, "stream": True}  # fmt: skip
        with c.stream("POST", "/v1/chat/completions", headers=ana, json=body) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 8:  # 8 tokens are more than the 5 a minute allows: hang up now
                    break
        time.sleep(0.5)
        r = chat(c, ana, temperature=1.0, max_tokens=2)
        assert r.status_code == 429, r.text


def test_tokens_per_minute_with_real_generation(tmp_path, tiny_run):
    settings = make_settings(tmp_path, rate_limit_tpm={"user": 30, "admin": 30, "anonymous": 30})
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url, timeout=60) as c:
        register(c, "root")
        register(c, "ana")
        root, ana = login(c, "root"), login(c, "ana")
        c.cookies.clear()
        used = 0
        while True:  # sampled requests: never from the cache, always real tokens
            r = chat(c, ana, temperature=1.0, max_tokens=12, min_tokens=12)
            if r.status_code != 200:
                break
            used += r.json()["usage"]["completion_tokens"]
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 30 <= used <= 30 + 12 and int(r.headers["Retry-After"]) >= 1
        # every model route is held back; streamed tokens count as well (24 of root's 30, then 12 more
        # overdraw the bucket: without the streamed ones 18 would be left)
        assert c.post("/v1/generate", headers=ana, json={"text": "Hola", "max_length": 2}).status_code == 429
        r = chat(c, root, temperature=1.0, max_tokens=24, min_tokens=24, stream=True)
        assert sum(1 for e in sse_events(r) if e["choices"] and e["choices"][0]["delta"].get("content")) > 0
        assert chat(c, root, temperature=1.0, max_tokens=12, min_tokens=12).status_code == 200
        assert chat(c, root, temperature=1.0).status_code == 429
        assert c.get("/v1/models", headers=root).status_code == 429


def test_requests_per_minute_on_the_model_routes(tmp_path, tiny_run):
    settings = make_settings(tmp_path, rate_limit_rpm={"user": 4, "admin": 100, "anonymous": 100})
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url, timeout=60) as c:
        register(c, "root")
        register(c, "ana")
        root, ana = login(c, "root"), login(c, "ana")
        c.cookies.clear()
        codes = [
            chat(c, ana).status_code,
            c.get("/v1/models", headers=ana).status_code,
            c.post("/v1/completions", headers=ana, json={"prompt": "Hola", "max_tokens": 2}).status_code,
            c.post("/predict", headers=ana, json={"prompt": "Hola", "max_length": 2}).status_code,
            chat(c, ana).status_code,
        ]
        assert codes == [200, 200, 200, 200, 429]
        r = c.post("/v1/generate", headers=ana, json={"text": "Hola", "max_length": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert chat(c, root).status_code == 200  # another caller has a bucket of its own


# --- values the schema fuzzing found: each one used to fail every request in the batch -------

HOSTILE = [
    ("/v1/chat/completions", {"messages": HOLA, "top_p": 1e-300}, "top_p"),
    ("/v1/chat/completions", {"messages": HOLA, "repetition_penalty": 5e-324}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": HOLA, "temperature": 1e-39}, "temperature"),
    ("/v1/chat/completions", {"messages": HOLA, "top_k": 2**64}, "top_k"),
    ("/v1/chat/completions", {"messages": HOLA, "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [2**70]}, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 40}, "prompt"),  # more sequences than the queue holds
    ("/v1/completions", {"prompt": ["x"] * 5, "n": 8}, "n"),
    ("/v1/generate", {"text": "Hola", "top_k": 2**63}, "top_k"),
    ("/predict", {"prompt": "Hola", "seed": -(2**64)}, "seed"),
]


def test_values_that_would_break_the_batch_are_400s(world):
    c, ana = world, world.tokens["ana"]
    # a stream runs alongside: it must finish cleanly whatever the others send
    stream = {"messages": HOLA, "max_tokens": 24, "temperature": 1.0, "stream": True}
    with (
        httpx.Client(base_url=c.url, timeout=60) as other,
        other.stream("POST", "/v1/chat/completions", headers=ana, json=stream) as s,
    ):
        for path, body, param in HOSTILE:
            r = c.post(path, headers=ana, json={"max_tokens": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), (path, body, r.text)
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert content(chat(c, ana, seed=2**63 - 1, temperature=1.0, n=2))
