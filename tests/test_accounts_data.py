"""Feedback, conversations, cache, durability and privacy over real HTTP on real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from accounts_helpers import build_app, chat, free_port, login, make_settings, register, serve

from semilla.privacy import scrub_pii

PAYLOADS = [
    "'; DROP TABLE feedback; --",
    "<script>alert('xss')</script><img src=x onerror=alert(1)>",
    "Robert'); DELETE FROM users WHERE ('1'='1",
    '" OR 1=1 -- ñandú 🌱 \u202e',
]


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def server(tmp_path, tiny_run):
    settings = make_settings(tmp_path)
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.settings = settings
        register(client, "root")
        yield client


def test_hostile_text_is_stored_and_returned_verbatim(server):
    h = login(server, "root")
    for text in PAYLOADS:
        fid = server.post("/feedback", headers=h, json={"rating": -1, "text": text}).json()["id"]
        assert server.get(f"/feedback/{fid}", headers=h).json()["text"] == text
        conv = server.post("/v1/conversations", headers=h, json={"title": text[:200]}).json()
        assert server.get(f"/v1/conversations/{conv['id']}", headers=h).json()["title"] == text[:200]
        key = server.post("/v1/keys", headers=h, json={"name": text[:100]}).json()
        assert key["name"] == text[:100]
    assert server.get("/admin/users", headers=h).status_code == 200  # the tables are all still there
    assert len(server.get("/feedback", headers=h).json()["data"]) == len(PAYLOADS)
    assert server.get("/feedback", headers=h).headers["content-type"] == "application/json"


def test_feedback_limits(server):
    h = login(server, "root")
    r = server.post("/feedback", headers=h, json={"rating": 1, "text": "x" * 6_000_000})
    assert (
        r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    )  # the server's body limit
    r = server.post("/feedback", headers=h, json={"rating": 1, "text": "x" * 5001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    for rating in (0, 6, -2, "good"):
        assert server.post("/feedback", headers=h, json={"rating": rating}).status_code == 400
    assert (
        server.post("/feedback", headers=h, json={"rating": 1, "completion_id": "cmpl-nope"}).status_code
        == 404
    )
    assert server.post("/feedback", headers=h, json={"rating": 3, "text": "y" * 5000}).status_code == 201
    # 1 is a thumb up unless the client says stars; a thumb of 3 does not exist
    thumb = server.post("/feedback", headers=h, json={"rating": 1}).json()
    star = server.post("/feedback", headers=h, json={"rating": 1, "scale": "stars"}).json()
    assert (thumb["scale"], thumb["positive"]) == ("thumbs", True)
    assert (star["scale"], star["positive"]) == ("stars", False)
    assert server.post("/feedback", headers=h, json={"rating": 3, "scale": "thumbs"}).status_code == 400


def test_identical_prompts_of_two_users_never_share_a_cache_entry(server):
    register(server, "ana")
    register(server, "bob")
    ana, bob = login(server, "ana"), login(server, "bob")
    first = content(chat(server, ana, "same", temperature=1.0, seed=1))
    assert content(chat(server, ana, "same", temperature=1.0, seed=1)) == first  # a hit
    assert content(chat(server, bob, "same", temperature=1.0, seed=1)) == first  # same model, own entry
    stats = server.get("/admin/cache", headers=login(server, "root")).json()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["entries"] == 2


def test_cache_is_bounded_and_expires():
    from semilla.serve.accounts.cache import ResponseCache

    now = [0.0]
    cache = ResponseCache(max_entries=2, max_bytes=100, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    cache.get("a")  # a is now the most recently used
    cache.put("c", 3, 10)
    assert cache.get("b") is None and cache.get("a") == 1
    cache.put("big", 4, 95)  # evicts by bytes
    assert cache.stats()["bytes"] <= 100
    now[0] = 11
    assert cache.get("big") is None  # expired
    assert cache.stats()["evictions"] >= 3


def test_conversations_record_turns_and_stay_private(server):
    register(server, "ana")
    register(server, "eve")
    ana, eve = login(server, "ana"), login(server, "eve")
    conv = server.post("/v1/conversations", headers=ana, json={}).json()
    messages = [{"role": "user", "content": "hola"}]
    answer = content(chat(server, ana, messages=messages, conversation_id=conv["id"]))
    chat(server, eve, "x", conversation_id=conv["id"])  # not eve's: nothing is appended
    got = server.get(f"/v1/conversations/{conv['id']}", headers=ana).json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "hola"), ("assistant", answer)]
    assert got["title"] == "hola"
    assert server.get("/v1/conversations", headers=eve).json()["data"] == []
    assert server.get(f"/v1/conversations/{conv['id']}", headers=eve).status_code == 404


def test_feedback_export_is_a_chat_dataset(server):
    from semilla.serve.accounts import open_store
    from semilla.serve.accounts.records import feedback_dataset

    h = login(server, "root")
    messages = [{"role": "user", "content": "write to ana@example.com"}]
    r = chat(server, h, messages=messages)
    cid, answer = r.json()["id"], content(r)
    assert (
        server.post(
            "/feedback", headers=h, json={"completion_id": cid, "rating": 1, "text": "nice"}
        ).status_code
        == 201
    )
    rows = list(feedback_dataset(open_store(server.settings)))
    assert rows == [{"messages": [{"role": "user", "content": "write to [EMAIL]"},  # PII scrubbed in logs
                                  {"role": "assistant", "content": answer}],
                     "rating": 1, "scale": "thumbs", "positive": True, "feedback": "nice", "model": "tiny", "completion_id": cid}]  # fmt: skip


def test_concurrent_writers_never_see_database_is_locked(server):
    headers = [login(server, "root") for _ in range(1)][0]
    errors: list[str] = []

    def writer(n: int) -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=60) as c:
            for i in range(15):
                r = c.post("/feedback", headers=headers, json={"rating": 1, "text": f"{n}-{i}"})
                if r.status_code != 201:
                    errors.append(r.text)
                if i % 5 == 0:
                    c.post("/v1/conversations", headers=headers, json={"title": f"{n}-{i}"})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = server.get("/feedback", headers=headers, params={"limit": 1000}).json()["data"]
    assert len(data) == 8 * 15


SERVER = """
import sys, uvicorn
from pathlib import Path
sys.path.insert(0, {tests!r})
from accounts_helpers import build_app, make_settings
uvicorn.run(build_app(make_settings(Path({tmp!r})), Path({run!r})), host="127.0.0.1", port={port}, log_level="error")
"""


@contextmanager
def server_process(tmp_path, tiny_run) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real server in its own process (so it can be killed with -9); yields it and its URL."""
    port = free_port()
    code = SERVER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), run=str(tiny_run), port=port)
    proc = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    try:
        # the subprocess imports torch, loads the model and may build the CPU kernels first
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(base + "/auth/me", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, f"the server exited with {proc.returncode}"
                assert time.monotonic() < deadline, "the server did not answer within 180 s"
                time.sleep(0.05)
        yield proc, base
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_during_a_feedback_burst_loses_no_acknowledged_write(tmp_path, tiny_run):
    with server_process(tmp_path, tiny_run) as (proc, base):
        c = httpx.Client(base_url=base, timeout=10)
        register(c, "root")
        h = login(c, "root")
        acknowledged: list[str] = []
        stop = threading.Event()

        def burst(n: int) -> None:
            i = 0
            while not stop.is_set():
                text = f"w{n}-{i}"
                try:
                    r = httpx.post(
                        base + "/feedback", headers=h, json={"rating": 1, "text": text}, timeout=10
                    )
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acknowledged.append(text)
                i += 1

        threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        deadline = (
            time.monotonic() + 60
        )  # a burst long enough to kill in the middle of, however slow the machine
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
    assert len(acknowledged) > 10
    db = sqlite3.connect(tmp_path / "data" / "semilla.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in db.execute("SELECT text FROM feedback")}
    assert set(acknowledged) <= stored


def test_kill_9_right_after_chat_answers_keeps_every_conversation_turn(tmp_path, tiny_run):
    with server_process(tmp_path, tiny_run) as (proc, base):
        c = httpx.Client(base_url=base, timeout=10)
        register(c, "root")
        h = login(c, "root")
        conv = c.post("/v1/conversations", headers=h, json={}).json()["id"]
        answers = []
        for i, stream in enumerate((False, True, False)):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"turno {i}"}], "max_tokens": 3,
                    "temperature": 1.0, "conversation_id": conv, "stream": stream}  # fmt: skip
            r = c.post("/v1/chat/completions", headers=h, json=body)
            assert r.status_code == 200 and r.text.strip().endswith("[DONE]" if stream else "}")
            answers.append(r)
        os.kill(proc.pid, signal.SIGKILL)  # the moment the last answer arrived
    db = sqlite3.connect(tmp_path / "data" / "semilla.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute(
        "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (conv,)
    ).fetchall()
    assert [r[1] for r in rows if r[0] == "user"] == ["turno 0", "turno 1", "turno 2"]
    assert [r[0] for r in rows] == ["user", "assistant"] * 3


def test_training_runs_are_indexed_from_run_directories(tmp_path, tiny_run):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny", ignore=shutil.ignore_patterns("last", "best", "tb", "data"))
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        listed = c.get("/training/runs").json()["data"]  # open mode on loopback
        assert [r["id"] for r in listed] == ["tiny"] and listed[0]["step"] > 0
        metrics = c.get("/training/runs/tiny/metrics").json()["data"]
        lines = (runs / "tiny" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == len(lines) and metrics[0]["kind"] == json.loads(lines[0])["kind"]
        with open(runs / "tiny" / "metrics.jsonl", "a") as f:  # a live run keeps appending
            f.write(json.dumps({"kind": "train", "step": 999, "time": time.time(), "loss": 1.5}) + "\n")
            f.write('{"kind": "train", "step": 10')  # half a line: read next time
        latest = c.get("/training/latest").json()
        assert latest["id"] == "tiny" and latest["step"] == 999 and latest["last"]["train"]["loss"] == 1.5
        assert len(c.get("/training/runs/tiny/metrics", params={"since_step": 998}).json()["data"]) == 1

        # a resume rewrites the file: the rows past its step go, and new ones soon pass the old end
        kept = [line for line in lines if json.loads(line)["step"] <= 4]
        new = [
            json.dumps({"kind": "train", "step": s, "time": time.time(), "loss": 2.0}) for s in range(5, 60)
        ]
        (runs / "tiny" / "metrics.jsonl").write_text("\n".join(kept + new) + "\n")
        metrics = c.get("/training/runs/tiny/metrics").json()["data"]
        assert [(m["kind"], m["step"]) for m in metrics] == [
            (json.loads(line)["kind"], json.loads(line)["step"]) for line in kept + new
        ]


def test_audit_log_records_logins_keys_and_admin_actions_without_pii(server):
    server.post("/auth/login", data={"username": "mallory@example.com", "password": "wrongwrong"})
    h = login(server, "root")
    key = server.post("/v1/keys", headers=h, json={"name": "ci"}).json()
    server.delete(f"/v1/keys/{key['id']}", headers=h)
    server.patch("/admin/users/1", headers=h, json={"role": "admin"})
    rows = server.get("/admin/audit", headers=h).json()["data"]
    actions = [(r["action"], r["success"]) for r in rows][::-1]
    assert actions[:2] == [("user.register", True), ("login", False)]
    assert {("login", True), ("key.create", True), ("key.revoke", True), ("user.update", True)} <= set(
        actions
    )
    failed = next(r for r in rows if r["action"] == "login" and not r["success"])
    assert failed["target"] == "mallory@example.com" or "[EMAIL]" in json.dumps(failed)


def test_retention_deletes_old_logs_but_keeps_rated_completions(server):
    from datetime import timedelta

    from semilla.serve.accounts import open_store
    from semilla.serve.accounts.audit import apply_retention
    from semilla.serve.accounts.db import AuditEntry, Completion, utcnow

    h = login(server, "root")
    old = chat(server, h, "old").json()["id"]
    rated = chat(server, h, "rated").json()["id"]
    server.post("/feedback", headers=h, json={"rating": 1, "completion_id": rated})
    store = open_store(server.settings)
    long_ago = utcnow() - timedelta(days=31)
    with store.write() as s:
        for row in s.query(Completion):
            row.created_at = long_ago
        s.query(AuditEntry).update({"at": long_ago})
    deleted = apply_retention(store, 30)
    assert deleted["completions"] == 1 and deleted["audit"] >= 2
    with store.read() as s:
        assert {c.id for c in s.query(Completion)} == {rated} and old != rated


def test_content_filter_refuses_prompts_and_withholds_outputs(tmp_path, tiny_run):
    import re

    import semilla

    # the tiny model's real greedy answer to "x"; its first three characters become a blocked pattern
    answer = semilla.load(str(tiny_run)).chat(
        [{"role": "user", "content": "x"}], max_new_tokens=8, temperature=0
    )
    assert len(answer) >= 3 and answer[:3] not in "x"
    words = tmp_path / "filter.txt"
    words.write_text(f"# blocked\nforbidden\nre:secret\\s+plan\nre:{re.escape(answer[:3])}\n")
    with serve(build_app(make_settings(tmp_path, content_filter_file=str(words)), tiny_run)) as url:
        c = httpx.Client(base_url=url, timeout=30)
        refused = [
            chat(c, prompt="a FORBIDDEN word"),
            chat(
                c,
                messages=[
                    {"role": "system", "content": "the secret  plan"},
                    {"role": "user", "content": "x"},
                ],
            ),
            c.post("/v1/completions", json={"model": "tiny", "prompt": "forbidden", "max_tokens": 2}),
            c.post("/v1/completions", json={"model": "tiny", "prompt": ["ok", "forbidden"], "max_tokens": 2}),
            c.post("/v1/generate", json={"text": "forbidden!", "max_length": 2}),
            c.post("/predict", json={"prompt": "Forbidden", "max_length": 2}),
        ]
        for r in refused:
            assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter", r.text
        assert chat(c, prompt="forbiddenness is fine").status_code == 200
        # the output: generation stops where the pattern appears, and the match is withheld
        for _ in range(2):  # a filtered answer is never cached: the second run is filtered again
            r = chat(c, prompt="x", max_tokens=8).json()["choices"][0]
            assert r["finish_reason"] == "content_filter" and answer.startswith(r["message"]["content"])
            assert answer[:3] not in r["message"]["content"]
        kw = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "temperature": 0,
              "stream": True}  # fmt: skip
        events = [line[6:] for line in c.post("/v1/chat/completions", json=kw).text.splitlines() if line]
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert answer[:3] not in streamed and answer.startswith(streamed)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to ana.perez@example.com", "write to [EMAIL]"),
        ("call +34 612 345 678 today", "call [PHONE] today"),
        ("card 4111 1111 1111 1111", "card [CARD]"),
        ("not a card 4111 1111 1111 1112", "not a card 4111 1111 1111 1112"),
        ("IBAN ES91 2100 0418 4502 0005 1332", "IBAN [IBAN]"),
        ("bad IBAN ES00 2100 0418 4502 0005 1332", "bad IBAN ES00 2100 0418 4502 0005 1332"),
        ("from 192.168.1.20 and 2001:db8::1", "from [IP] and [IP]"),
        (
            "version 999.1.1.1, 2024-05-01 12:30:00, step 12000",
            "version 999.1.1.1, 2024-05-01 12:30:00, step 12000",
        ),
    ],
)
def test_pii_scrubber(text, expected):
    assert scrub_pii(text) == expected
