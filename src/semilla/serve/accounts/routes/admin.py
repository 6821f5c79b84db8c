"""/admin/*: users and roles, every key, the cache, the audit log, retention, reload (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from semilla.serve.accounts import records, users
from semilla.serve.accounts.audit import apply_retention, audit, audit_rows
from semilla.serve.accounts.content_filter import ContentFilter
from semilla.serve.accounts.deps import Accounts, Admin, RowId, actor
from semilla.serve.accounts.hooks import client_ip
from semilla.serve.errors import APIError
from semilla.serve.protocol import Body

router = APIRouter(prefix="/admin", tags=["admin"])


class UserChange(Body):
    role: str | None = None
    disabled: bool | None = None


@router.get("/users")
def list_users(principal: Admin, accounts: Accounts) -> dict:
    return {"object": "list", "data": users.list_users(accounts.store)}


@router.patch("/users/{user_id}")
def change_user(
    user_id: RowId, body: UserChange, principal: Admin, request: Request, accounts: Accounts
) -> dict:
    if user_id == principal.user_id and (body.role not in (None, "admin") or body.disabled):
        raise APIError(400, "an admin cannot demote or disable themselves", param="user_id")
    user = users.update_user(accounts.store, user_id, body.role, body.disabled)
    audit(accounts.store, "user.update", actor(principal), target=f"user:{user_id}", ip=client_ip(request),
          detail=body.model_dump(exclude_none=True))  # fmt: skip
    return users.user_dict(user)


@router.get("/keys")
def list_all_keys(principal: Admin, accounts: Accounts) -> dict:
    return {"object": "list", "data": users.list_keys(accounts.store, None)}


@router.delete("/keys/{key_id}", status_code=204)
def revoke_any_key(key_id: RowId, principal: Admin, request: Request, accounts: Accounts) -> Response:
    users.revoke_key(accounts.store, key_id, None)
    audit(accounts.store, "key.revoke", actor(principal), target=f"key:{key_id}", ip=client_ip(request))
    return Response(status_code=204)


@router.get("/cache")
def cache_stats(principal: Admin, accounts: Accounts) -> dict:
    return accounts.cache.stats()


@router.delete("/cache")
def clear_cache(principal: Admin, request: Request, accounts: Accounts) -> dict:
    cleared = accounts.cache.clear()
    audit(accounts.store, "cache.clear", actor(principal), ip=client_ip(request), detail={"entries": cleared})
    return {"cleared": cleared}


@router.get("/audit")
def list_audit(
    principal: Admin,
    accounts: Accounts,
    limit: int = Query(100, ge=1, le=1000),
    action: str | None = Query(None, max_length=64),
    before_id: int | None = Query(None, ge=1, le=2**62),
) -> dict:
    return {"object": "list", "data": audit_rows(accounts.store, limit, action, before_id)}


@router.get("/feedback")
def list_all_feedback(principal: Admin, accounts: Accounts, limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"object": "list", "data": records.list_feedback(accounts.store, None, everyone=True, limit=limit)}


@router.post("/retention")
def run_retention(principal: Admin, request: Request, accounts: Accounts) -> dict:
    deleted = apply_retention(accounts.store, accounts.settings.retention_days)
    audit(accounts.store, "retention", actor(principal), ip=client_ip(request), detail=deleted)
    return {"deleted": deleted, "retention_days": accounts.settings.retention_days}


@router.post("/reload")
def reload(principal: Admin, request: Request, accounts: Accounts) -> dict:
    """Re-read the content filter and clear the response cache (cached identities follow the
    store by themselves: see accounts.generation)."""
    try:
        accounts.content_filter = ContentFilter.load(accounts.settings.content_filter_file)
    except ValueError as e:
        raise APIError(400, str(e), code="bad_content_filter") from None
    cleared = accounts.cache.clear()
    audit(accounts.store, "reload", actor(principal), ip=client_ip(request))
    return {
        "reloaded": True,
        "cache_cleared": cleared,
        "filter_patterns": len(accounts.content_filter.patterns),
    }
