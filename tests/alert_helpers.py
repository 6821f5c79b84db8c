"""For the alerting tests: the shipped rules with windows short enough for a test, a webhook
receiver on loopback, and a way to wait for an alert's state."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from accounts_helpers import login, register
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from semilla.serve.alerts import DEFAULT_RULES
from semilla.serve.settings import ServerSettings

FAST = dict(alert_interval_s=0.1)


def fast_rules(path: Path, window: str = "2s", for_: str = "300ms", keep: str = "1s") -> str:
    """The shipped rules file, expressions untouched, with every range, `for` and
    `keep_firing_for` shortened for a test."""
    text = DEFAULT_RULES.read_text(encoding="utf-8")
    text = re.sub(r"\[5m\]", f"[{window}]", text)
    text = re.sub(r"(?m)^(\s+)for: (?!0s)\S+$", rf"\1for: {for_}", text)
    text = re.sub(r"(?m)^(\s+)keep_firing_for: \S+$", rf"\1keep_firing_for: {keep}", text)
    path.write_text(text, encoding="utf-8")
    return str(path)


def admin_session(client: httpx.Client) -> dict[str, str]:
    """Register the server's first account (an admin) and return its headers."""
    register(client, "admin")
    return login(client, "admin")


def alert_status(client: httpx.Client, name: str, headers: dict | None = None) -> str:
    """'firing', 'pending', 'resolved' (lately) or 'inactive' for the rule `name`."""
    state = client.get("/admin/alerts", headers=headers or {}).json()
    for status in ("firing", "pending", "resolved"):
        if any(a["name"] == name for a in state[status]):
            return status
    return "inactive"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> float:
    """Seconds until `predicate()` holds; AssertionError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(interval)
    return time.monotonic() - start


def webhook_app(behaviour: Callable[[int], str]) -> FastAPI:
    """An alert receiver whose n-th call (from 0) does behaviour(n): 'ok', '500' or 'hang'
    (answers after 2 s). The bodies of the calls answered 'ok' are kept in app.state.received."""
    app = FastAPI()
    app.state.settings = ServerSettings(_env_file=None)
    app.state.calls, app.state.received = 0, []

    @app.post("/hook")
    async def hook(request: Request):
        n, app.state.calls = app.state.calls, app.state.calls + 1
        body = await request.json()
        mode = behaviour(n)
        if mode == "hang":
            await asyncio.sleep(2)
        if mode == "500":
            return JSONResponse({"error": "receiver broke"}, status_code=500)
        app.state.received.append(body)
        return {"ok": True}

    return app
