"""A/B routes (admins): GET /admin/ab compares the variants; POST /admin/ab/{route}/promote
sends all of a route's traffic to the winner, without a restart."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field, StrictStr
from starlette.concurrency import run_in_threadpool

from semilla.serve import abtest
from semilla.serve.protocol import Body
from semilla.serve.routes.models import admin, log_action
from semilla.serve.routes.openai import JSON_BODY

router = APIRouter(tags=["admin"])


class Promote(Body):
    variant: StrictStr = Field(min_length=1)


@router.get("/admin/ab")
async def ab_report(request: Request) -> dict:
    """Each A/B route's variants: share, availability, requests, errors, latency, tokens, feedback
    and a two-proportion z-test of their feedback against the control (the first variant)."""
    await admin(request)
    accounts = getattr(request.app.state, "accounts", None)
    store = accounts.store if accounts is not None else None
    data = await run_in_threadpool(abtest.report, request.app.state.semilla.router, store)
    return {"object": "list", "data": data}


@router.post("/admin/ab/{route}/promote", dependencies=JSON_BODY)
async def promote(route: str, body: Promote, request: Request) -> dict:
    """The test is over: all of `route`'s traffic goes to `variant` (until the providers file is
    reloaded, which restores its split)."""
    principal = await admin(request)
    split = request.app.state.semilla.router.promote(route, body.variant)
    await log_action(request, principal, "ab.promote", target=route, variant=body.variant)
    return {"route": route, "split": split.weights}
