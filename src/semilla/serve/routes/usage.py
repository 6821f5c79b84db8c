"""GET /admin/usage (admins): usage and cost by model or user over time, as JSON or CSV."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from semilla.serve import usage
from semilla.serve.errors import APIError
from semilla.serve.routes.models import admin

router = APIRouter(tags=["admin"])


def prices(settings) -> usage.Prices:
    return usage.Prices(settings.price_prompt_per_1k, settings.price_completion_per_1k, settings.price_per_second,
                        settings.price_currency)  # fmt: skip


@router.get("/admin/usage")
async def usage_report(
    request: Request,
    by: Literal["model", "user"] = "model",
    period: Literal["hour", "day"] = "day",
    days: float = Query(7.0, gt=0, le=3660),
    format: Literal["json", "csv"] = "json",
):
    """Requests, tokens, generation seconds and cost per period and model (or user)."""
    await admin(request)
    accounts = getattr(request.app.state, "accounts", None)
    if accounts is None:
        raise APIError(409, "usage needs the request log of the accounts store", code="conflict")
    await run_in_threadpool(accounts.writer.flush)  # completions still queued count too
    settings = request.app.state.settings
    rows = await run_in_threadpool(usage.usage, accounts.store, prices(settings), by, period, days)
    if format == "csv":
        return Response(
            usage.to_csv(rows, by),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="semilla-usage-by-{by}.csv"'},
        )
    return {"object": "list", "by": by, "period": period, "currency": settings.price_currency, "data": rows}
