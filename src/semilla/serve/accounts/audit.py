"""The audit log (logins, keys, admin actions, model changes) and the retention job."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy import text as sql

from semilla.privacy import scrub_value
from semilla.serve.accounts.db import AuditEntry, Completion, Feedback, RevokedToken, Store, utcnow

log = logging.getLogger("semilla.audit")
RETENTION_LOCK = 0x73656D696C6C62  # PostgreSQL advisory lock id: one replica applies retention at a time


def audit(
    store: Store,
    action: str,
    actor: str,
    *,
    target: str = "",
    ip: str = "",
    success: bool = True,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row (details PII-scrubbed) and log it."""
    text = json.dumps(scrub_value(detail or {}), ensure_ascii=False)
    with store.write() as s:
        s.add(
            AuditEntry(
                action=action, actor=actor, target=target[:200], ip=ip[:64], success=success, detail=text
            )
        )
    log.debug(
        "%s %s by %s%s", action, "ok" if success else "FAILED", actor, f" on {target}" if target else ""
    )


def audit_rows(
    store: Store, limit: int = 100, action: str | None = None, before_id: int | None = None
) -> list[dict]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        q = q.where(AuditEntry.action == action)
    if before_id:
        q = q.where(AuditEntry.id < before_id)
    with store.read() as s:
        return [
            {
                "id": a.id,
                "at": a.at.isoformat() + "Z",
                "action": a.action,
                "success": a.success,
                "actor": a.actor,
                "target": a.target,
                "ip": a.ip,
                "detail": json.loads(a.detail or "{}"),
            }
            for a in s.scalars(q)
        ]


def apply_retention(store: Store, days: int) -> dict[str, int]:
    """Delete request logs (those nobody rated) and audit rows older than `days`, and dead tokens.
    Replicas on one PostgreSQL run it one at a time: one that finds another running it deletes
    nothing (an advisory lock held by the transaction)."""
    nothing = {"completions": 0, "audit": 0, "revoked_tokens": 0}
    if days <= 0:
        return nothing
    cutoff = utcnow() - timedelta(days=days)
    rated = exists().where(Feedback.completion_id == Completion.id)
    with store.write() as s:
        if s.get_bind().dialect.name == "postgresql":
            lock = sql("SELECT pg_try_advisory_xact_lock(:key)")
            if not s.execute(lock, {"key": RETENTION_LOCK}).scalar_one():
                return nothing
        completions = s.execute(delete(Completion).where(Completion.created_at < cutoff, ~rated)).rowcount
        rows = s.execute(delete(AuditEntry).where(AuditEntry.at < cutoff)).rowcount
        tokens = s.execute(delete(RevokedToken).where(RevokedToken.expires_at < utcnow())).rowcount
    return {"completions": completions, "audit": rows, "revoked_tokens": tokens}
