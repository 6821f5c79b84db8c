"""POST /feedback, GET /feedback, GET /feedback/{id}: ratings on one's own completions."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from semilla.serve.accounts import records
from semilla.serve.accounts.deps import Accounts, FeedbackCaller, RowId
from semilla.serve.protocol import Body

router = APIRouter(prefix="/feedback", tags=["feedback"])
MAX_TEXT = 5000


class NewFeedback(Body):
    completion_id: str | None = Field(None, max_length=64)
    conversation_id: str | None = Field(None, max_length=64)
    rating: int = Field(description="-1 or +1 (thumbs), or 1-5 (stars)")
    scale: Literal["thumbs", "stars"] | None = Field(
        None, description="default: thumbs for -1/+1, stars for 2-5 (send 'stars' for one star)"
    )
    text: str = Field("", max_length=MAX_TEXT)


@router.post("", status_code=201)
async def add_feedback(body: NewFeedback, principal: FeedbackCaller, accounts: Accounts) -> dict:
    if body.completion_id is not None:
        await run_in_threadpool(accounts.writer.flush)  # the completion may still be in the queue
    return await run_in_threadpool(
        records.add_feedback, accounts.store, principal, body.rating, body.text, body.completion_id,
        body.conversation_id, body.scale,
    )  # fmt: skip


@router.get("")
def list_feedback(
    principal: FeedbackCaller, accounts: Accounts, limit: int = Query(100, ge=1, le=1000)
) -> dict:
    return {"object": "list", "data": records.list_feedback(accounts.store, principal.user_id, limit=limit)}


@router.get("/{feedback_id}")
def get_feedback(feedback_id: RowId, principal: FeedbackCaller, accounts: Accounts) -> dict:
    return records.get_feedback(accounts.store, feedback_id, principal.user_id)
