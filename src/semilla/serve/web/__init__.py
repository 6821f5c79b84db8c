"""The web client: chat (`/`), API keys (`/keys`) and the admin dashboard (`/admin`).

Plain HTML, CSS and JavaScript under `static/`, served by the server itself: no CDN, no build
step, nothing remote. The pages talk to the same HTTP API as every other client (the session
is the HttpOnly cookie `/auth/login` sets). Model and user text is only ever put in the page as
text nodes (see `static/markdown.js`), and a strict Content-Security-Policy backs that up.

    install(app, settings)   # pages, assets, security headers, GET /admin/stats and its sampler
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from semilla.serve.settings import ServerSettings
from semilla.serve.web.routes import STATIC, SecurityHeaders, router
from semilla.serve.web.stats import StatsSampler

log = logging.getLogger("semilla.web")


def chat_url(settings: ServerSettings) -> str:
    """Where a browser on this machine finds the chat (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"


def install(app: FastAPI, settings: ServerSettings, stats_interval_s: float = 5.0) -> None:
    """Serve the web client from `app` and sample its metrics for the dashboard while it runs."""
    from fastapi.staticfiles import StaticFiles

    accounts = getattr(app.state, "accounts", None)
    shared = None
    if accounts is not None and accounts.redis is not None:  # replicas: sum everyone's counters
        from semilla.serve.web.replicas import SharedTotals

        shared = SharedTotals(accounts.redis, stats_interval_s)
    app.state.web_stats = sampler = StatsSampler(stats_interval_s, shared=shared)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with inner(app) as state:
            task = asyncio.create_task(sampler.run(), name="semilla-web-stats")
            url = chat_url(settings)
            log.info("chat in the browser: %s  (dashboard %sadmin, API keys %skeys)", url, url, url)
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
