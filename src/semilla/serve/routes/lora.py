"""LoRA adapters over HTTP, in vLLM's shapes: admin-only POST /v1/load_lora_adapter and
/v1/unload_lora_adapter. Serving a loaded adapter is a request whose `model` names it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field, StrictStr
from starlette.concurrency import run_in_threadpool

from semilla.serve import adapters
from semilla.serve.protocol import Body
from semilla.serve.routes.models import NonEmpty, admin, log_action
from semilla.serve.routes.openai import JSON_BODY

router = APIRouter(tags=["lora"])


class LoadLoraAdapter(Body):
    lora_name: NonEmpty
    lora_path: NonEmpty
    base_model_name: StrictStr | None = Field(None, min_length=1)  # default: the default model


class UnloadLoraAdapter(Body):
    lora_name: NonEmpty


@router.post("/v1/load_lora_adapter", dependencies=JSON_BODY)
async def load_lora_adapter(body: LoadLoraAdapter, request: Request) -> PlainTextResponse:
    """Serve the PEFT directory lora_path (on the server) as model lora_name."""
    principal = await admin(request)
    state = request.app.state.semilla
    backend = await run_in_threadpool(
        adapters.load_adapter, state, body.lora_name, body.lora_path, body.base_model_name
    )
    await log_action(request, principal, "lora.load", target=backend.id, path=body.lora_path,
                     base=backend.parent)  # fmt: skip
    return PlainTextResponse(f"Success: LoRA adapter '{backend.id}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=JSON_BODY)
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request) -> PlainTextResponse:
    """Stop serving adapter lora_name; requests running with it finish first."""
    principal = await admin(request)
    adapters.unload_adapter(request.app.state.semilla, body.lora_name)
    await log_action(request, principal, "lora.unload", target=body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
