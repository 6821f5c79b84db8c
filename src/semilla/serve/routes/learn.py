"""/admin/learn: start, stop and watch the self-learning loop on a run of the runs directory
(admins only; the job itself is serve/learn_job.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field, StrictStr
from starlette.concurrency import run_in_threadpool

from semilla.serve.hooks import Principal
from semilla.serve.learn_job import LearnJobs
from semilla.serve.protocol import Body
from semilla.serve.routes.models import admin, log_action

router = APIRouter(prefix="/admin/learn", tags=["admin"])
Admin = Annotated[Principal, Depends(admin)]


class StartLearning(Body):
    run: Annotated[StrictStr, Field(min_length=1, max_length=200)]  # a run directory's name under runs_dir
    teacher: Annotated[StrictStr | None, Field(max_length=300)] = (
        None  # PROVIDER/MODEL, as `semilla learn --teacher`
    )
    rounds: int = Field(1, ge=1, le=100_000)
    forever: bool = False  # rounds until stopped, waiting for the question limits
    settings: dict[str, Any] = Field(
        default_factory=dict
    )  # LearnConfig fields: teacher_url, questions_per_hour...


def jobs(request: Request) -> LearnJobs:
    """The app's one LearnJobs (made on first use; the handlers run on the event loop, so once)."""
    state = request.app.state
    if getattr(state, "learn_jobs", None) is None:
        state.learn_jobs = LearnJobs(state.settings.runs_dir)
    return state.learn_jobs


@router.get("")
async def learn_status(principal: Admin, request: Request) -> dict:
    return await run_in_threadpool(jobs(request).status)


@router.post("/start")
async def start_learning(body: StartLearning, principal: Admin, request: Request) -> dict:
    status = jobs(request).start(body.run, body.teacher, body.settings, body.rounds, body.forever)
    await log_action(request, principal, "learn.start", target=f"run:{body.run}", rounds=body.rounds,
                     forever=body.forever, teacher=body.teacher or status["job"].get("teacher_model"))  # fmt: skip
    return status


@router.post("/stop")
async def stop_learning(principal: Admin, request: Request) -> dict:
    status = jobs(request).stop()
    await log_action(request, principal, "learn.stop", target=f"run:{status['job']['run']}")
    return status
