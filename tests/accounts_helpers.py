"""The real semilla server (create_app + the tiny trained model) on a loopback port, for the
accounts tests: every model route, the accounts layer and a real SQLite store under tmp."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from server_helpers import free_port, running_server

from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings

__all__ = ["SECRET", "build_app", "chat", "free_port", "login", "make_settings", "register", "serve"]

SECRET = "x" * 48
MODEL = "tiny"  # the tiny run's 32-token context: keep prompts short and max_tokens small


def make_settings(tmp: Path, **overrides) -> ServerSettings:
    """Settings for one test server; the database, secret and runs always live under `tmp`."""
    values = dict(
        data_dir=str(tmp / "data"), jwt_secret=SECRET, runs_dir=str(tmp / "runs"), auth_attempts_per_minute=1000,
        rate_limit_rpm={"anonymous": 10_000, "user": 10_000, "admin": 10_000}, retention_days=30,
        max_slots=4, queue_size=32,
    )  # fmt: skip
    values.update(overrides)
    return ServerSettings(_env_file=None, **values)


def build_app(settings: ServerSettings, run: Path) -> FastAPI:
    """The server `semilla serve` runs: create_app with the tiny model served as 'tiny'."""
    return create_app(settings, load_models([(MODEL, str(run))]))


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    with running_server(app) as url:
        yield url


def chat(client: httpx.Client, headers: dict | None = None, prompt: str = "Hola", **body) -> httpx.Response:
    """POST /v1/chat/completions with one user message (greedy, a few tokens unless told)."""
    payload = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
               "temperature": 0, **body}  # fmt: skip
    return client.post("/v1/chat/completions", headers=headers or {}, json=payload)


def register(client: httpx.Client, username: str, password: str = "correct horse battery") -> dict:
    r = client.post("/auth/register", json={"username": username, "password": password})
    assert r.status_code == 201, r.text
    return r.json()


def login(client: httpx.Client, username: str, password: str = "correct horse battery") -> dict[str, str]:
    r = client.post("/auth/login", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}
