"""Typed dependencies for the accounts routes: the hooks object and the authorized caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from semilla.serve.accounts.hooks import AccountHooks
from semilla.serve.hooks import Principal


def get_accounts(request: Request) -> AccountHooks:
    return request.app.state.accounts


def caller(scope: str):
    """A dependency authorizing the request for `scope` routes (401/403/429 otherwise)."""

    async def authorized(request: Request) -> Principal:
        return await request.app.state.accounts.authorize(request, scope)

    return Depends(authorized)


Accounts = Annotated[AccountHooks, Depends(get_accounts)]
AccountUser = Annotated[Principal, caller("account")]
FeedbackCaller = Annotated[Principal, caller("feedback")]
ConversationsCaller = Annotated[Principal, caller("conversations")]
TrainingCaller = Annotated[Principal, caller("training")]
Admin = Annotated[Principal, caller("admin")]


def actor(principal: Principal) -> str:
    return principal.scope


# Ids in paths: bounded so a huge number is a 400, never an overflow in the database driver
RowId = Annotated[int, Path(ge=1, le=2**62)]
