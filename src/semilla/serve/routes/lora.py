"""LoRA adapters over HTTP.

vLLM's admin-only POST /v1/load_lora_adapter and /v1/unload_lora_adapter; serving a loaded
adapter is a request whose `model` names it. The chat's flow: POST /v1/lora/generate (the
seed's /api/lora/generate with its field names) trains an adapter from a conversation in the
background (serve/lora_jobs.py); GET /v1/lora/jobs/{id} follows it, the adapter downloads as
.safetensors or a PEFT zip, and /v1/lora/stats counts the LoRA files generated.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import Field, StrictStr
from starlette.concurrency import run_in_threadpool

from semilla.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from semilla.serve import adapters
from semilla.serve.accounts import domains, records
from semilla.serve.errors import APIError
from semilla.serve.hooks import Principal
from semilla.serve.lora_jobs import LoraJob, LoraJobs, normalize_domain
from semilla.serve.protocol import Body
from semilla.serve.protocol import Request as RequestBody
from semilla.serve.routes.models import NonEmpty, admin, log_action
from semilla.serve.routes.openai import JSON_BODY
from semilla.serve.settings import ServerSettings

router = APIRouter(tags=["lora"])

Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class LoadLoraAdapter(Body):
    lora_name: NonEmpty
    lora_path: NonEmpty
    base_model_name: Name | None = None  # default: the default model


class UnloadLoraAdapter(RequestBody):
    lora_name: NonEmpty


class ChatTurn(Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr = Field(max_length=100_000)


Turns = Annotated[list[ChatTurn], Field(min_length=1, max_length=1000)]


class LoraGenerate(Body):
    domain: Name
    conversation_id: Name | None = None  # one of the caller's conversations
    messages: Turns | None = None  # or the conversation itself
    model: Name | None = None  # the base model; default: the default model
    adapter: Name | None = None  # the name it is served under; default: MODEL-DOMAIN
    max_iters: int | None = Field(None, ge=1, le=10_000)
    lora_r: int = Field(8, ge=1, le=256)


class SeedLoraGenerate(RequestBody):
    """The seed's body: conversation (messages or a conversation id), domain, model, target_model."""

    conversation: Turns | Name
    domain: Name
    model: Name | None = None
    target_model: Name | None = None


def install(app: FastAPI, settings: ServerSettings) -> None:
    """The adapter routes and the server's LoRA jobs (under <data_dir>/lora)."""
    app.state.lora_jobs = LoraJobs(
        app.state.semilla, Path(settings.data_dir) / "lora", max_domains=settings.lora_max_domains,
        per_owner=settings.lora_jobs_per_user, queue_size=settings.lora_job_queue,
        default_iters=settings.lora_job_iters,
        known_domains=lambda: domains.conversation_domains(app.state.accounts.store),
    )  # fmt: skip
    app.include_router(router)


# --- vLLM's runtime adapter routes ------------------------------------------------------------


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


# --- jobs ---------------------------------------------------------------------------------------


def owner_of(principal: Principal) -> str:
    """Jobs belong to the account (its keys and sessions alike), else to the caller's scope."""
    return f"user:{principal.user_id}" if principal.user_id is not None else principal.scope


def conversation_messages(request: Request, principal: Principal, conversation_id: str) -> list[dict]:
    """The messages of one of the caller's conversations (404 for another's)."""
    accounts = request.app.state.accounts
    accounts.writer.flush()  # its last turn may still be queued
    found = records.get_conversation(accounts.store, conversation_id, principal.user_id)
    return [{"role": m["role"], "content": m["content"]} for m in found["messages"]]


async def start_job(
    request: Request, principal: Principal, conversations: list[list[dict]], domain: str, **options
) -> dict:
    jobs: LoraJobs = request.app.state.lora_jobs
    job = await run_in_threadpool(jobs.submit, owner_of(principal), conversations, domain, **options)
    await log_action(request, principal, "lora.job", target=job.id, domain=job.domain, adapter=job.adapter)
    return job.view(jobs.directory / job.id)


@router.post("/v1/lora/generate", dependencies=JSON_BODY, status_code=202)
async def generate_adapter(body: LoraGenerate, request: Request) -> dict:
    """Train an adapter for `domain` in the background from one conversation (its id, or its
    messages), else from every conversation of the caller tagged with `domain`; the job's id
    answers at once."""
    principal = await request.app.state.hooks.authorize(request, "models")
    if body.conversation_id is not None and body.messages is not None:
        raise APIError(400, "give conversation_id or messages, not both", param="conversation_id")
    if body.messages is not None:
        conversations = [[m.model_dump() for m in body.messages]]
    elif body.conversation_id is not None:
        conversations = [
            await run_in_threadpool(conversation_messages, request, principal, body.conversation_id)
        ]
    else:
        conversations = await run_in_threadpool(tagged_conversations, request, principal, body.domain)
    return await start_job(
        request, principal, conversations, body.domain, base=body.model, adapter=body.adapter,
        max_iters=body.max_iters, lora_r=body.lora_r,
    )  # fmt: skip


def tagged_conversations(request: Request, principal: Principal, domain: str) -> list[list[dict]]:
    """The caller's conversations tagged with `domain` (a 400 when there is none)."""
    accounts = request.app.state.accounts
    accounts.writer.flush()
    where = domains.ConversationFilter(domain=normalize_domain(domain), user_id=principal.user_id)
    found = domains.filtered_conversations(accounts.store, where)
    if not found:
        raise APIError(
            400, f"you have no conversation tagged {where.domain!r}: give conversation_id or messages, or tag one "
            "(PATCH /v1/conversations/ID with a domain)", param="conversation_id",
        )  # fmt: skip
    return found


@router.post("/api/lora/generate", dependencies=JSON_BODY, status_code=202)
async def generate_adapter_seed(body: SeedLoraGenerate, request: Request) -> dict:
    """/v1/lora/generate with the chat seed's field names."""
    principal = await request.app.state.hooks.authorize(request, "models")
    if isinstance(body.conversation, str):
        messages = await run_in_threadpool(conversation_messages, request, principal, body.conversation)
    else:
        messages = [m.model_dump() for m in body.conversation]
    return await start_job(
        request, principal, [messages], body.domain, base=body.model, adapter=body.target_model
    )


async def owned_job(request: Request, job_id: str) -> tuple[LoraJobs, LoraJob]:
    principal = await request.app.state.hooks.authorize(request, "models")
    jobs: LoraJobs = request.app.state.lora_jobs
    return jobs, jobs.get(job_id, owner_of(principal), principal.role == "admin")


@router.get("/v1/lora/jobs")
async def list_jobs(request: Request) -> dict:
    principal = await request.app.state.hooks.authorize(request, "models")
    jobs: LoraJobs = request.app.state.lora_jobs
    mine = jobs.list(owner_of(principal), principal.role == "admin")
    return {"object": "list", "data": [j.view(jobs.directory / j.id) for j in mine]}


@router.get("/v1/lora/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict:
    jobs, job = await owned_job(request, job_id)
    return job.view(jobs.directory / job.id)


@router.post("/v1/lora/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    jobs, job = await owned_job(request, job_id)
    return jobs.cancel(job).view(jobs.directory / job.id)


async def finished_adapter(request: Request, job_id: str) -> tuple[LoraJob, Path]:
    jobs, job = await owned_job(request, job_id)
    if job.status != "succeeded":
        raise APIError(409, f"job {job.id} is {job.status}: it has no adapter", code="conflict")
    return job, jobs.adapter_dir(job)


@router.get("/v1/lora/jobs/{job_id}/adapter.safetensors")
async def download_weights(job_id: str, request: Request) -> FileResponse:
    """The adapter's weights (PEFT's adapter_model.safetensors)."""
    job, directory = await finished_adapter(request, job_id)
    return FileResponse(directory / ADAPTER_WEIGHTS, filename=f"{job.adapter}.safetensors")


@router.get("/v1/lora/jobs/{job_id}/adapter.zip")
async def download_peft(job_id: str, request: Request) -> Response:
    """The PEFT directory (adapter_config.json + adapter_model.safetensors) as a zip."""
    job, directory = await finished_adapter(request, job_id)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            archive.write(directory / name, f"{job.adapter}/{name}")
    return Response(buffer.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job.adapter}.zip"'})  # fmt: skip


@router.get("/v1/lora/stats")
async def lora_stats(request: Request) -> dict:
    """LoRA files generated, jobs by status, the domains in use and their limit, the adapters served."""
    principal = await request.app.state.hooks.authorize(request, "models")
    jobs: LoraJobs = request.app.state.lora_jobs
    seen = jobs.list(owner_of(principal), principal.role == "admin")
    return {
        "lora_files_generated": jobs.generated(),
        "jobs": dict(Counter(j.status for j in seen)),  # the caller's (an admin's: all), by status
        "domains": sorted(jobs.domains()),
        "max_domains": jobs.max_domains,
        "adapters": adapters.adapter_names(request.app.state.semilla),
    }
