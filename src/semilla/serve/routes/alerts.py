"""Operations routes (admins): the in-process alerts, their rules and the webhook's deliveries
(GET /admin/alerts); each model's drift (GET /admin/drift) and re-measuring its baseline."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from semilla.serve.errors import APIError

router = APIRouter(tags=["admin"])


@router.get("/admin/alerts")
async def list_alerts(request: Request) -> dict:
    """Firing, pending and recently resolved alerts, the rules, the health check and the webhook."""
    await request.app.state.hooks.authorize(request, "admin")
    notifier = request.app.state.alert_webhook
    return request.app.state.alerts.state() | {"webhook": notifier.state() if notifier else None}


def _drift(request: Request):
    drift = request.app.state.drift
    if drift is None:
        raise APIError(409, "drift checks are off (semilla serve --drift-interval SECONDS)", code="conflict")
    return drift


@router.get("/admin/drift")
async def drift_state(request: Request) -> dict:
    """Each served model's latest perplexity, baseline and ratio, by source."""
    await request.app.state.hooks.authorize(request, "admin")
    return _drift(request).state()


@router.post("/admin/drift/{model}/baseline")
async def reset_drift_baseline(model: str, request: Request) -> dict:
    """Measure `model`'s baseline again now (after a deliberate change, such as a new version)."""
    await request.app.state.hooks.authorize(request, "admin")
    drift, models = _drift(request), request.app.state.semilla.models
    if model not in models:
        raise APIError(404, f"no local model {model!r} (loaded: {', '.join(models) or 'none'})",
                       param="model", code="model_not_found")  # fmt: skip
    return await run_in_threadpool(drift.reset_baseline, model, dict(models))
