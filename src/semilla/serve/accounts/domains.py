"""Conversations by domain: the tag a conversation carries ('medicina'), and the conversations
a LoRA fine-tune learns from (`semilla finetune --from-db`, /v1/lora/generate by domain).

The domain is free text checked by the caller (serve.lora_jobs.normalize_domain) and limited
in number there; this module only stores and reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from semilla.atomic import atomic_write_text
from semilla.errors import SemillaError
from semilla.serve.accounts.db import Conversation, Feedback, Message, Store, User, utcnow
from semilla.serve.accounts.records import _own_conversation, get_conversation, is_positive


def conversation_domains(store: Store) -> set[str]:
    """Every domain some conversation is tagged with."""
    with store.read() as s:
        return set(s.scalars(select(Conversation.domain).where(Conversation.domain.is_not(None)).distinct()))


def set_conversation_domain(
    store: Store, conversation_id: str, user_id: int | None, domain: str | None
) -> dict:
    """Tag one of the user's conversations with `domain` (None: untag it); 404 for another's."""
    with store.write() as s:
        conv = _own_conversation(s, conversation_id, user_id)
        conv.domain = domain
        conv.updated_at = utcnow()
    return get_conversation(store, conversation_id, user_id)


@dataclass
class ConversationFilter:
    """Which stored conversations to learn from; None: any."""

    domain: str | None = None
    user_id: int | None = None  # with `username` unset: this account's (None: anyone's)
    username: str | None = None
    positive_only: bool = False  # rated up at least once and never down
    since: datetime | None = None  # last changed at or after (UTC)
    until: datetime | None = None  # last changed before (UTC)


def filtered_conversations(store: Store, where: ConversationFilter) -> list[list[dict]]:
    """The messages ([{"role", "content"}, ...]) of each conversation `where` selects, oldest
    first. A username that names no account is a ValueError."""
    q = select(Conversation).order_by(Conversation.created_at, Conversation.id)
    with store.read() as s:
        if where.username is not None:
            user = s.scalar(select(User).where(User.username == where.username))
            if user is None:
                raise ValueError(f"no account named {where.username!r} in the database")
            q = q.where(Conversation.user_id == user.id)
        elif where.user_id is not None:
            q = q.where(Conversation.user_id == where.user_id)
        if where.domain is not None:
            q = q.where(Conversation.domain == where.domain)
        if where.since is not None:
            q = q.where(Conversation.updated_at >= where.since)
        if where.until is not None:
            q = q.where(Conversation.updated_at < where.until)
        found = []
        for conv in s.scalars(q):
            messages = list(
                s.scalars(select(Message).where(Message.conversation_id == conv.id).order_by(Message.id))
            )
            if where.positive_only and not rated_up(s, conv, messages):
                continue
            found.append([{"role": m.role, "content": m.content} for m in messages])
        return found


def rated_up(s, conv: Conversation, messages: list[Message]) -> bool:
    """Whether the conversation (or one of its answers) got positive feedback and none negative."""
    answers = [m.completion_id for m in messages if m.completion_id]
    ratings = s.execute(
        select(Feedback.rating, Feedback.scale).where(
            or_(Feedback.conversation_id == conv.id, Feedback.completion_id.in_(answers))
        )
    ).all()
    verdicts = [is_positive(r, scale) for r, scale in ratings]
    return any(verdicts) and all(verdicts)


def export_conversations(url: str, where: ConversationFilter, path: str | os.PathLike) -> int:
    """Write the conversations `where` selects from the server database at `url` (SQLite or
    PostgreSQL) to `path` as chat JSONL ({"messages": [...]} per line); returns how many.
    Only reads: a SQLite file that does not exist, an unreachable server or a database the
    server never upgraded is a SemillaError naming it."""
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        raise SemillaError(f"--from-db: no database at {url.split('///', 1)[-1]}")
    try:
        store = Store(url)
    except ImportError as e:  # PostgreSQL without its driver
        raise SemillaError(
            f"--from-db {url.split(':', 1)[0]}: {e.name} is missing: pip install 'semilla[replicas]'"
        ) from None
    except ArgumentError as e:
        raise SemillaError(f"--from-db: {url!r} is not a database URL: {e}") from None
    try:
        rows = filtered_conversations(store, where)
    except ValueError as e:
        raise SemillaError(f"--from-db: {e}") from None
    except SQLAlchemyError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SemillaError(
            f"--from-db: cannot read conversations from {store.engine.url!r}: {first}"
        ) from None
    finally:
        store.dispose()
    atomic_write_text(path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows))
    return len(rows)
