"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from semilla import __version__
from semilla.serve.errors import APIError

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict:
    """Alive, and how each model is doing. Never touches the engine's lock or a model, and
    runs on the event loop (no threadpool worker to wait for under load)."""
    state = request.app.state.semilla
    models = {}
    for name in state.models:
        worker = state.engine.workers.get(name)
        models[name] = {
            "state": "ready" if state.engine.alive else "stopped",
            "active": len(worker.active) if worker else 0,
            "waiting": len(worker.waiting) if worker else 0,
            "slots": state.engine.max_slots,
        }
    return {
        "status": "ok" if state.engine.alive else "degraded",
        "version": __version__,
        "uptime_s": round(time.time() - state.started, 1),
        "models": models,
    }


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once models are loaded and the engine runs; 503 before."""
    state = request.app.state.semilla
    if not state.ready:
        raise APIError(503, "not ready: no model loaded yet", code="not_ready", headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "models": list(state.models)})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text. Public while the server is open or with metrics_public; otherwise an
    admin's token or key (Prometheus: `authorization: {credentials: sk-...}`)."""
    hooks = request.app.state.hooks
    if not request.app.state.settings.metrics_public:
        try:
            await hooks.authorize(request, "admin")
        except APIError:
            if not hooks.serves_anonymous():  # as of this request: authorize caught up with the store
                raise
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
