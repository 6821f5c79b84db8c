"""What an outside probe broke, over raw sockets against a real server: bad Unicode, strict
numbers, unexpected errors, ambiguous request framing, foreign Host names and slow headers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from server_helpers import RawConnection, running_server

from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings

USER = {"role": "user", "content": "Hola"}


def settings_for(tmp: Path, **overrides) -> ServerSettings:
    unlimited = {"anonymous": 10**9, "user": 10**9, "admin": 10**9}
    values = dict(data_dir=str(tmp), max_slots=4, queue_size=16, rate_limit_rpm=unlimited)
    return ServerSettings(_env_file=None, **(values | overrides))


@pytest.fixture(scope="module")
def models(tiny_run: Path):
    return load_models([("tiny", str(tiny_run))])


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    app = create_app(settings_for(tmp_path_factory.mktemp("data"), header_timeout_s=2.0), models)

    async def boom():
        raise RuntimeError("a bug nobody foresaw")

    app.add_api_route("/boom", boom)
    with running_server(app) as url:
        yield url


@pytest.fixture
def conn(server: str):
    c = RawConnection(server)
    yield c
    c.close()


def post_json(conn: RawConnection, path: str, body: dict, **headers) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \\ud800
    conn.request("POST", path, data, {"Content-Type": "application/json", **headers})
    status, head, raw = conn.response()
    return status, head, json.loads(raw) if raw else {}


def health_on(conn: RawConnection) -> int:
    conn.request("GET", "/health")
    return conn.response()[0]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "\udfff"}, USER]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "stream": True}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [USER], "stop": ["ok", "\ud800"]}, "stop"),
        ("/v1/chat/completions", {"messages": [USER], "user": "\ud800"}, "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages.0.content.0.text"),
        ("/v1/completions", {"prompt": "a\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": "a", "stream": True, "stop": "\udc00"}, "stop"),
        ("/v1/generate", {"text": "a\ud800"}, "text"),
        ("/predict", {"prompt": "\ud800", "stream": True}, "prompt"),
        ("/feedback", {"rating": 1, "text": "\ud800"}, "text"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field_and_the_connection_lives(conn, path, body, param):
    status, _, answer = post_json(conn, path, {"model": "tiny", "max_tokens": 2, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and "unicode" in answer["error"]["message"].lower()
    assert health_on(conn) == 200  # the same keep-alive connection answers the next request


@pytest.mark.parametrize("field, value", [("max_tokens", "4"), ("max_tokens", True), ("max_tokens", 4.0),
                                          ("temperature", "0.5"), ("n", True), ("seed", "7"), ("stream", "true"),
                                          ("top_k", False)])  # fmt: skip
def test_numbers_and_flags_must_have_their_json_type(conn, field, value):
    status, _, answer = post_json(
        conn, "/v1/chat/completions", {"messages": [USER], "max_tokens": 2, field: value}
    )
    assert status == 400 and answer["error"]["param"] == field, answer


def test_an_unexpected_error_is_a_500_and_the_connection_lives(conn):
    conn.request("GET", "/boom")
    status, _, raw = conn.response()
    assert status == 500
    assert json.loads(raw)["error"] == {
        "message": "internal server error", "type": "server_error", "param": None, "code": None
    }  # fmt: skip
    assert health_on(conn) == 200


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(conn):
    smuggled = b"GET /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + body
    )
    status, headers, raw = conn.response()
    assert status == 400 and json.loads(raw)["error"]["code"] == "ambiguous_framing"
    assert headers["connection"] == "close"
    assert conn.response()[0] == 0  # the smuggled request got no answer: the connection is gone


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8000", "localhost.evil.example"])
def test_a_foreign_host_name_is_refused_while_the_server_is_open(conn, host):
    for method, path, body in [("GET", "/", b""), ("GET", "/v1/models", b""),
                               ("POST", "/v1/chat/completions", json.dumps({"messages": [USER]}).encode())]:  # fmt: skip
        conn.request(method, path, body, {"Host": host, "Content-Type": "application/json"})
        status, _, raw = conn.response()
        assert status == 400 and json.loads(raw)["error"]["code"] == "host_not_allowed", (path, raw)


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "chat.localhost",
                                  "192.168.1.20:8000"])  # fmt: skip
def test_loopback_names_and_addresses_are_served(conn, host):
    conn.request("GET", "/v1/models", headers={"Host": host})
    assert conn.response()[0] == 200


def test_configured_host_names_are_served_and_checked_even_with_accounts(models, tmp_path):
    from accounts_helpers import SECRET, register

    settings = settings_for(tmp_path, allowed_hosts="api.example.com", jwt_secret=SECRET)
    with running_server(create_app(settings, models)) as url:
        import httpx

        with httpx.Client(base_url=url) as client:
            register(client, "ana")  # authentication is on from here
            assert client.get("/health", headers={"Host": "api.example.com"}).status_code == 200
            assert client.get("/health", headers={"Host": "evil.example.com"}).status_code == 400


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    slow = RawConnection(server)
    start = time.monotonic()
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 150:
            slow.send(bytes([byte]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert slow.closed_by_server()
    assert time.monotonic() - start < 6  # the 2 s header deadline, not the 9 s of trickling
    slow.close()
    silent = RawConnection(server)
    time.sleep(3)
    assert silent.closed_by_server()  # a connection that never sends a request is not kept either
    silent.close()


def test_a_request_whose_answer_outlasts_the_header_deadline_is_not_cut(conn):
    status, _, answer = post_json(conn, "/v1/chat/completions", {"messages": [USER], "max_tokens": 4})
    assert status == 200
    time.sleep(1)
    assert health_on(conn) == 200  # a kept-alive connection gets a fresh deadline per request


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semilla", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"SEMILLA_DATA_DIR": tempfile.mkdtemp()})  # fmt: skip


def test_a_bad_port_is_one_line_and_exit_2(tiny_run):
    done = run_serve(str(tiny_run), "--port", "99999")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("semilla: error:") and done.stderr.count("\n") == 1, done.stderr
    assert "port" in done.stderr


def test_a_port_in_use_is_one_line_and_exit_2_before_any_banner(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve(str(tiny_run), "--port", str(port))
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr
        == f"semilla: error: cannot listen on 127.0.0.1:{port}: the port is in use by another program\n"
    )


def test_an_int8_copy_has_as_many_parameters_as_its_model(tiny_run, tmp_path):
    from semilla.export.quantize import quantize_int8

    int8 = quantize_int8(tiny_run, tmp_path / "int8")
    served = load_models([("fp32", str(tiny_run)), ("int8", str(int8))])
    with running_server(create_app(settings_for(tmp_path / "data"), served)) as url:
        import httpx

        cards = {m["id"]: m["parameters"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert cards["int8"] == cards["fp32"] > 0


SERVE_AND_REPORT = """
import gc, json, sys, threading, uvicorn
from semilla.serve.server import serve
from semilla.serve.settings import ServerSettings

def report(self, sockets=None):  # instead of serving: what the collector sees at that moment
    module = sys.modules.get("sentence_transformers")
    print(json.dumps({
        "imported": module is not None,
        "importing": any(t.name == "semilla-retrieval-imports" for t in threading.enumerate()),
        "module_in_sight": any(o is module for o in gc.get_objects()),
        "frozen": gc.get_freeze_count(),
    }))

uvicorn.Server.run = report
serve([sys.argv[1]], ServerSettings(_env_file=None, data_dir=sys.argv[2], port=0))
"""


def test_the_server_serves_only_once_the_retrieval_libraries_are_imported_and_frozen(tiny_run, tmp_path):
    # imported after the freeze (under load, the first minute), their ~300k objects were walked
    # by every full collection: /health stalled 0.1-0.4 s while 64 clients streamed
    done = subprocess.run([sys.executable, "-c", SERVE_AND_REPORT, str(tiny_run), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["imported"] and not seen["importing"]
    assert not seen["module_in_sight"] and seen["frozen"] > 100_000


def test_served_connections_send_small_answers_at_once() -> None:
    """The listening socket is made so that the event loop sets TCP_NODELAY on every connection
    it accepts (as uvicorn serves it: loop.create_server on that socket); without it, each
    answer on a kept-alive connection waited ~40 ms for the client's delayed acknowledgement."""
    import asyncio
    import socket

    from semilla.serve.server import bind_socket

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = bind_socket("127.0.0.1", 0)
        server = await loop.create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_burst_of_requests_reads_the_auth_generation_once_or_twice(models, tmp_path):
    """Each request first reads the store's auth generation (a revoked key is refused on the next
    request). 64 requests arriving together each took a worker thread for it, and the threads'
    queue for the GIL held the event loop, and so /health, 70-120 ms. Now the burst shares a read."""
    import asyncio
    import threading

    import httpx

    app = create_app(settings_for(tmp_path), models)
    generation = app.state.hooks.generation
    reads, read = [], generation.current

    def counted() -> int:
        reads.append(threading.get_ident())
        time.sleep(0.01)  # a store under load: the burst piles up behind the first read
        return read()

    generation.current = counted

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            answers = await asyncio.gather(*(client.get(url + "/v1/models") for _ in range(64)))
        return [a.status_code for a in answers]

    with running_server(app) as url:
        assert asyncio.run(burst(url)) == [200] * 64
    assert 1 <= len(reads) <= 8  # one per read in flight, not one per request
