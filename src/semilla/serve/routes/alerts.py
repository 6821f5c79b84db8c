"""GET /admin/alerts (admins): the in-process alerts, their rules and the webhook's deliveries."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(tags=["admin"])


@router.get("/admin/alerts")
async def list_alerts(request: Request) -> dict:
    """Firing, pending and recently resolved alerts, the rules, the health check and the webhook."""
    await request.app.state.hooks.authorize(request, "admin")
    notifier = request.app.state.alert_webhook
    return request.app.state.alerts.state() | {"webhook": notifier.state() if notifier else None}
