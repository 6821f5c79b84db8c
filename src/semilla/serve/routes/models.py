"""Runtime model switching (admins): /admin/models to list, load, unload, choose the default and
reload the providers file; simpleIA's GET/POST /model as aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import Field, StrictStr
from starlette.concurrency import run_in_threadpool

from semilla.errors import SemillaError
from semilla.serve import switching
from semilla.serve.accounts.audit import audit
from semilla.serve.accounts.hooks import client_ip
from semilla.serve.errors import APIError
from semilla.serve.hooks import Principal
from semilla.serve.protocol import Body
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.registry import model_specs
from semilla.serve.routes.openai import JSON_BODY

router = APIRouter(tags=["admin"])


NonEmpty = Annotated[StrictStr, Field(min_length=1)]


class LoadModel(Body):
    name: NonEmpty
    path: NonEmpty


class DefaultModel(Body):
    model: NonEmpty


class SimpleIAModel(RequestBody):
    model_name: NonEmpty


async def admin(request: Request) -> Principal:
    return await request.app.state.hooks.authorize(request, "admin")


async def log_action(request: Request, principal: Principal, action: str, target: str = "", **detail) -> None:
    """An audit row, when the accounts store is installed."""
    accounts = getattr(request.app.state, "accounts", None)
    if accounts is not None:
        await run_in_threadpool(
            audit,
            accounts.store,
            action,
            principal.scope,
            target=target,
            ip=client_ip(request),
            detail=detail,
        )


def default_name(state) -> str | None:
    return state.router.default or next(iter(state.local), None)


@router.get("/admin/models")
async def list_models(request: Request) -> dict:
    """Every model name with its card, the routes, the providers (kind, URL, cooldown; no key)."""
    await admin(request)
    state = request.app.state.semilla
    return {
        "object": "list",
        "data": state.cards(admin=True),
        "default": default_name(state),
        "routes": {name: chain.links for name, chain in state.router.routes.items()},
        "providers": state.router.provider_states(),
        "providers_file": state.settings.providers or None,
    }


@router.post("/admin/models", dependencies=JSON_BODY, status_code=201)
async def load_model(body: LoadModel, request: Request) -> dict:
    """Load a checkpoint (a path on the server) and serve it as `name`."""
    principal = await admin(request)
    state = request.app.state.semilla
    served = await run_in_threadpool(switching.load_checkpoint, state, body.name, body.path)
    await log_action(request, principal, "model.load", target=body.name, path=body.path)
    return state.local[served.id].card(admin=True)


@router.delete("/admin/models/{name}", status_code=204)
async def unload_model(name: str, request: Request) -> Response:
    principal = await admin(request)
    switching.unload(request.app.state.semilla, name)
    await log_action(request, principal, "model.unload", target=name)
    return Response(status_code=204)


@router.post("/admin/models/default", dependencies=JSON_BODY)
async def choose_default(body: DefaultModel, request: Request) -> dict:
    """The model (or route) of requests that name none."""
    principal = await admin(request)
    name = switching.set_default(request.app.state.semilla, body.model)
    await log_action(request, principal, "model.default", target=name)
    return {"default": name}


@router.post("/admin/models/reload")
async def reload_providers(request: Request) -> dict:
    """Re-read the providers file: its providers, routes, templates, cooldown and checkpoints."""
    principal = await admin(request)
    summary = await switching.reload_providers(request.app.state.semilla)
    await log_action(
        request, principal, "providers.reload", loaded=summary["loaded"], unloaded=summary["unloaded"]
    )
    return summary


@router.get("/model")
async def current_model(request: Request) -> dict:
    """simpleIA: the model requests get when they name none, and who provides it."""
    await request.app.state.hooks.authorize(request, "models")
    state = request.app.state.semilla
    name = default_name(state)
    return {"model": name, "provider": state.backend(name).owned_by if name else None}


@router.post("/model", dependencies=JSON_BODY)
async def switch_model(body: SimpleIAModel, request: Request) -> dict:
    """simpleIA: {"model_name": ...} makes a served model, route or provider/model the default;
    a checkpoint path is loaded first (under its directory's name)."""
    principal = await admin(request)
    state = request.app.state.semilla
    name = body.model_name
    try:
        state.backend(name)
    except APIError:
        try:
            name, path = model_specs([body.model_name])[0]
        except (SemillaError, ValueError):  # ValueError: a path no file system takes (NUL)
            raise APIError(400, f"no model or checkpoint {name!r}", param="model_name") from None
        if name not in state.local:
            await run_in_threadpool(switching.load_checkpoint, state, name, path)
    switching.set_default(state, name)
    await log_action(request, principal, "model.default", target=name)
    return {"model": name, "provider": state.backend(name).owned_by}
