"""The gRPC API through real `grpcio` clients on loopback, beside the HTTP API of the same server:
the same text for the same seed, the same keys and limits, gRPC statuses for refusals, the
standard health service, and a cancelled stream's engine slot freed."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from accounts_helpers import build_app, login, make_settings, register, serve
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import running_server, wait_until
from test_serve_openai import HELLO, random_checkpoint

from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.rpc import stubs
from semilla.serve.settings import ServerSettings

pb, services = stubs()
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory, corpus_text: str):
    """An open server on loopback with HTTP and gRPC; yields (app, base URL, gRPC channel)."""
    long = random_checkpoint(tmp_path_factory.mktemp("long"), corpus_text)
    models = load_models([("tiny", str(tiny_run)), ("long", str(long))])
    settings = ServerSettings(
        _env_file=None, max_slots=4, queue_size=8, grpc_port=0, max_body_bytes=MAX_BODY,
        data_dir=str(tmp_path_factory.mktemp("data")),
    )  # fmt: skip
    app = create_app(settings, models)
    with running_server(app) as url, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        yield app, url, channel


@pytest.fixture
def stub(server) -> services.SemillaStub:
    return services.SemillaStub(server[2])


def chat_request(model: str = "long", messages=HELLO, **sampling) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=model,
        messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages],
        sampling=pb.Sampling(**sampling),
    )


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_models_are_listed_and_the_health_service_says_serving(server, stub):
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny", "long"]
    checks = health_pb2_grpc.HealthStub(server[2])
    for service in ("", "semilla.v1.Semilla"):
        reply = checks.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert refusal(lambda: checks.Check(health_pb2.HealthCheckRequest(service="nope"))).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_streamed_text_equals_the_http_apis_for_the_same_seed(server, stub):
    _, url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kw = dict(max_tokens=40, temperature=0.9, top_k=20, seed=123)
    http_chunks = client.chat.completions.create(
        model="long", messages=HELLO, stream=True, extra_body={"top_k": 20},
        **{k: v for k, v in kw.items() if k != "top_k"},
    )  # fmt: skip
    http_text = "".join(c.choices[0].delta.content or "" for c in http_chunks if c.choices)
    chunks = list(stub.ChatStream(chat_request(**kw)))
    assert "".join(c.text for c in chunks) == http_text and len(http_text) > 0
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-2].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "long"
    whole = stub.Chat(chat_request(**kw))  # unary: the same text at once
    assert whole.choices[0].text == http_text and whole.usage.total_tokens == chunks[-1].usage.total_tokens

    prompt = "En un lugar"
    http_completion = client.completions.create(model="long", prompt=prompt, max_tokens=30, seed=7)
    request = pb.CompletionRequest(model="long", prompt=prompt, sampling=pb.Sampling(max_tokens=30, seed=7))
    streamed = "".join(c.text for c in stub.CompleteStream(request))
    assert streamed == http_completion.choices[0].text == stub.Complete(request).choices[0].text


def test_bad_arguments_are_invalid_argument_and_unknown_models_not_found(stub):
    e = refusal(lambda: stub.Chat(chat_request(temperature=5.0)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.details()
    e = refusal(lambda: stub.Chat(chat_request(messages=[{"role": "robot", "content": "hi"}])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in e.details()
    e = refusal(lambda: list(stub.ChatStream(chat_request(messages=[]))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in e.details()
    e = refusal(lambda: stub.Chat(chat_request(model="tiny", max_tokens=5000)))  # a 32-token context
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.details()
    e = refusal(lambda: stub.Chat(chat_request(model="nope")))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.details()


def test_an_oversized_message_is_resource_exhausted(server, stub):
    e = refusal(lambda: stub.Chat(chat_request(messages=[{"role": "user", "content": "a" * (MAX_BODY + 1)}])))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ListModels(pb.ListModelsRequest()).models  # the server goes on


def test_a_cancelled_stream_frees_its_engine_slot(server, stub):
    app = server[0]
    worker = app.state.semilla.engine.workers["long"]
    stream = stub.ChatStream(chat_request(max_tokens=900, temperature=1.0))
    for _ in range(3):
        assert next(stream).text is not None
    assert len(worker.active) == 1  # generating, far from its 900 tokens
    stream.cancel()
    assert wait_until(lambda: not worker.active and not worker.waiting, timeout=10)
    assert stream.code() == grpc.StatusCode.CANCELLED


def test_metrics_count_grpc_calls_beside_the_engines(server, stub):
    from semilla.serve.web.stats import read_totals

    _, url, _ = server
    before = read_totals()
    stub.Chat(chat_request(model="tiny", max_tokens=3, temperature=0))
    refusal(lambda: stub.Chat(chat_request(model="nope")))
    after = read_totals()  # the dashboard counts them with the HTTP requests
    assert {k: after.requests.get(k, 0) - before.requests.get(k, 0) for k in ("2xx", "4xx")} == {
        "2xx": 1,
        "4xx": 1,
    }
    text = httpx.get(url + "/metrics").text
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Chat"}' in text
    assert 'grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Chat"}' in text
    assert 'grpc_server_handling_seconds_count{grpc_method="Chat"}' in text
    assert 'semilla_completion_tokens_total{model="tiny"}' in text


def test_the_same_keys_and_rate_limits_as_http(tmp_path: Path, tiny_run: Path):
    limits = {"anonymous": 100, "user": 3, "admin": 1000}
    app = build_app(make_settings(tmp_path, grpc_port=0, rate_limit_rpm=limits), tiny_run)
    with serve(app) as url, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        c = httpx.Client(base_url=url, timeout=30)
        register(c, "root")  # the first account: the server now requires a credential
        key = c.post("/v1/keys", headers=login(c, "root"), json={"name": "grpc"}).json()["key"]
        stub = services.SemillaStub(channel)
        request = chat_request(model="tiny", messages=[{"role": "user", "content": "Hola"}], max_tokens=3)
        e = refusal(lambda: stub.Chat(request))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "authentication required" in e.details()
        e = refusal(lambda: stub.Chat(request, metadata=[("authorization", "Bearer sk-wrong")]))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        admin = [("authorization", f"Bearer {key}")]
        assert stub.Chat(request, metadata=admin).usage.completion_tokens > 0
        narrow = c.post("/v1/keys", headers=login(c, "root"), json={"name": "fb", "scopes": ["feedback"]})
        e = refusal(
            lambda: stub.Chat(request, metadata=[("authorization", f"Bearer {narrow.json()['key']}")])
        )
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'models' scope" in e.details()

        register(c, "limited")
        user = [("authorization", login(c, "limited")["Authorization"])]
        codes = []
        for _ in range(4):  # 3 a minute: the fourth is refused, with when to retry
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=user)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                retry = dict(e.trailing_metadata())["retry-after"]
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert int(retry) >= 1
        # the gRPC completion is in the request log like an HTTP one
        from semilla.serve.accounts.db import Completion

        accounts = app.state.accounts
        accounts.writer.flush()
        with accounts.store.read() as s:
            assert [(r.route, r.model) for r in s.query(Completion)] == [("chat", "tiny")]


def test_serve_refuses_a_busy_grpc_port_in_one_line(tiny_run: Path, tmp_path: Path):
    import socket

    from helpers import assert_one_line_error, clean_env, run_cli
    from server_helpers import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(PORT=str(free_port()))
        proc = run_cli("serve", f"tiny={tiny_run}", "--data-dir", tmp_path, "--grpc-port", str(port), env=env)
    assert_one_line_error(proc, f"127.0.0.1:{port}", "in use")


def test_an_app_without_grpc_port_serves_no_grpc(tiny_run: Path, tmp_path: Path):
    app = create_app(
        ServerSettings(_env_file=None, data_dir=str(tmp_path)), load_models([("tiny", str(tiny_run))])
    )
    with running_server(app):
        assert not hasattr(app.state, "grpc_port")


def test_the_python_client_example_talks_to_the_server(server):
    import subprocess
    import sys

    from helpers import clean_env

    example = Path(__file__).resolve().parent.parent / "examples" / "grpc_client.py"
    address = f"127.0.0.1:{server[0].state.grpc_port}"
    proc = subprocess.run([sys.executable, str(example), "--address", address, "--model", "long"],
                          capture_output=True, text=True, timeout=120, env=clean_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["health: SERVING", "models: tiny, long"]
    whole = re.fullmatch(r"chat: (.*) \((\d+) tokens\)", lines[2], re.DOTALL)
    assert whole and 0 < int(whole[2]) <= 48
    assert lines[3] == "stream: " + whole[1]  # the same seed: the same text, streamed


def test_a_database_outage_is_unavailable_then_recovers(tmp_path: Path, tiny_run: Path):
    from replica_helpers import running_postgres

    with running_postgres() as pg:
        app = build_app(make_settings(tmp_path, grpc_port=0, database_url=pg.url), tiny_run)
        with serve(app) as url, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            c = httpx.Client(base_url=url, timeout=30)
            register(c, "root")
            key = [
                (
                    "authorization",
                    "Bearer "
                    + c.post("/v1/keys", headers=login(c, "root"), json={"name": "k"}).json()["key"],
                )
            ]
            stub = services.SemillaStub(channel)
            pg.stop()
            e = refusal(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=key))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "database" in e.details()
            assert dict(e.trailing_metadata())["retry-after"] == "5"
            pg.start()
            assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=key).models] == ["tiny"]
