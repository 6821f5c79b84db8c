"""POST/GET/DELETE /v1/keys: a user's own API keys (a key is shown once, stored hashed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import Field

from semilla.serve.accounts import users
from semilla.serve.accounts.audit import audit
from semilla.serve.accounts.deps import Accounts, AccountUser, RowId, actor
from semilla.serve.accounts.hooks import client_ip
from semilla.serve.protocol import Body

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class NewKey(Body):
    name: str = Field("default", min_length=1, max_length=100)
    scopes: list[str] | None = Field(None, max_length=len(users.SCOPES))
    expires_in_days: int | None = Field(None, ge=1, le=3650)


@router.post("", status_code=201)
def create_key(body: NewKey, principal: AccountUser, request: Request, accounts: Accounts) -> dict:
    scopes = body.scopes
    if scopes and "admin" in scopes and principal.role != "admin":
        scopes = [s for s in scopes if s != "admin"] or None  # a key never has more than its owner
    secret, row = users.create_key(accounts.store, principal.user_id, body.name, scopes, body.expires_in_days)
    audit(accounts.store, "key.create", actor(principal), target=f"key:{row.id}", ip=client_ip(request),
          detail={"name": body.name, "scopes": row.scopes})  # fmt: skip
    return users.key_dict(row) | {"object": "api_key", "key": secret}


@router.get("")
def list_keys(principal: AccountUser, accounts: Accounts) -> dict:
    return {"object": "list", "data": users.list_keys(accounts.store, principal.user_id)}


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: RowId, principal: AccountUser, request: Request, accounts: Accounts) -> Response:
    users.revoke_key(accounts.store, key_id, principal.user_id)
    audit(accounts.store, "key.revoke", actor(principal), target=f"key:{key_id}", ip=client_ip(request))
    return Response(status_code=204)
