"""A real accounts server on a loopback port for the accounts tests (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request

from semilla.serve.accounts import install
from semilla.serve.errors import install_error_handlers
from semilla.serve.hooks import CompletionRecord
from semilla.serve.settings import ServerSettings

SECRET = "x" * 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(tmp: Path, **overrides) -> ServerSettings:
    values = dict(
        data_dir=str(tmp / "data"), jwt_secret=SECRET, runs_dir=str(tmp / "runs"), auth_attempts_per_minute=1000,
        rate_limit_rpm={"anonymous": 10_000, "user": 10_000, "admin": 10_000}, retention_days=30,
    )  # fmt: skip
    values.update(overrides)
    return ServerSettings(_env_file=None, **values)


def build_app(settings: ServerSettings) -> FastAPI:
    """The accounts layer on a bare app, plus a stand-in model route that uses every hook."""
    app = FastAPI()
    install_error_handlers(app)
    install(app, settings)

    @app.post("/v1/fake/completions")
    async def fake_completion(request: Request) -> dict:
        body = await request.json()
        hooks = request.app.state.hooks
        principal = await hooks.authorize(request, "models")
        prompt = body.get("prompt", "")
        hooks.screen_prompt(principal, prompt)
        material = {"model": "fake", "prompt": prompt, "seed": body.get("seed")}
        cached = hooks.cache_get(principal, material) if body.get("seed") is not None else None
        if cached is not None:
            return cached | {"cached": True}
        n = int(body.get("n_tokens", 3))
        text = body.get("output", prompt[::-1])
        cid = f"cmpl-{time.monotonic_ns()}"
        result = {"id": cid, "text": text, "filtered": hooks.screen_output(text), "cached": False}
        hooks.record_tokens(principal, n)
        hooks.record_completion(
            principal,
            CompletionRecord(id=cid, model="fake", route="completions", prompt=body.get("messages") or prompt,
                             outputs=[text], finish_reasons=["stop"], prompt_tokens=len(prompt),
                             completion_tokens=n, latency_ms=1.0, conversation_id=body.get("conversation_id")),
        )  # fmt: skip
        if body.get("seed") is not None:
            hooks.cache_put(principal, material, result, len(text))
        return result

    return app


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(5)


def register(client: httpx.Client, username: str, password: str = "correct horse battery") -> dict:
    r = client.post("/auth/register", json={"username": username, "password": password})
    assert r.status_code == 201, r.text
    return r.json()


def login(client: httpx.Client, username: str, password: str = "correct horse battery") -> dict[str, str]:
    r = client.post("/auth/login", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}
