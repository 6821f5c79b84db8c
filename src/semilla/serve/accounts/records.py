"""What users leave behind: the request log, conversations and feedback.

Finished completions are queued and written by one background thread (the model routes never
wait on the disk); feedback and conversation edits are written before the route answers, so an
acknowledged write is on disk (`synchronous=FULL`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select

from semilla.privacy import scrub_value
from semilla.serve.accounts.db import Completion, Conversation, Feedback, Message, Store, utcnow
from semilla.serve.errors import APIError
from semilla.serve.hooks import CompletionRecord, Principal

log = logging.getLogger(__name__)


def iso(d) -> str:
    return d.isoformat() + "Z"


def owned_by(column, user_id: int | None):
    """Rows of `user_id`; in open mode (no accounts) the anonymous rows, whose owner is NULL."""
    return column.is_(None) if user_id is None else column == user_id


# --- the request log ------------------------------------------------------------------------


class CompletionWriter:
    """A queue of finished completions drained into the store by one daemon thread."""

    def __init__(self, store: Store, scrub: bool):
        self.store, self.scrub = store, scrub
        self._queue: queue.Queue = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="semilla-records", daemon=True)
        self._thread.start()

    def submit(self, principal: Principal, record: CompletionRecord) -> None:
        try:
            self._queue.put_nowait((principal, record))
        except queue.Full:
            log.warning("request log queue full: completion %s not recorded", record.id)

    def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self.write(*item)
            except Exception:
                log.exception("could not record completion")
            finally:
                self._queue.task_done()

    def write(self, principal: Principal, r: CompletionRecord) -> None:
        """Write one record now, in the caller's thread (durable when it returns)."""
        prompt, outputs = (
            (scrub_value(r.prompt), scrub_value(r.outputs)) if self.scrub else (r.prompt, r.outputs)
        )
        with self.store.write() as s:
            s.merge(
                Completion(
                    id=r.id, user_id=principal.user_id, key_id=principal.key_id, model=r.model, route=r.route,
                    prompt=json.dumps(prompt, ensure_ascii=False), outputs=json.dumps(outputs, ensure_ascii=False),
                    prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                    latency_ms=r.latency_ms, conversation_id=r.conversation_id,
                )
            )  # fmt: skip
            conv = s.get(Conversation, r.conversation_id) if r.conversation_id else None
            if conv is not None and conv.user_id == principal.user_id:
                append_turn(s, conv, r)


def is_regeneration(s, conv: Conversation, messages: list) -> bool:
    """A request that re-asks the conversation's last question without its last answer:
    stored [..., user Q, assistant A] and the request ends [..., not A, user Q]."""
    tail = s.scalars(
        select(Message).where(Message.conversation_id == conv.id).order_by(Message.id.desc()).limit(2)
    ).all()
    if len(tail) < 2 or tail[0].role != "assistant" or tail[1].role != "user":
        return False
    asked = messages[-1]
    before = messages[-2] if len(messages) > 1 else {}
    answered_again = before.get("role") == "assistant" and before.get("content") == tail[0].content
    return asked.get("content") == tail[1].content and not answered_again


def append_turn(s, conv: Conversation, r: CompletionRecord) -> None:
    """The newest user message of the request and the first output join the conversation; a
    regenerated answer replaces the last one instead."""
    if isinstance(r.prompt, list) and r.prompt:
        last = r.prompt[-1]
        if isinstance(last, dict) and last.get("role") == "user":
            if is_regeneration(s, conv, r.prompt):
                previous = s.scalars(
                    select(Message)
                    .where(Message.conversation_id == conv.id)
                    .order_by(Message.id.desc())
                    .limit(1)
                ).one()
                s.delete(previous)
            else:
                s.add(Message(conversation_id=conv.id, role="user", content=str(last.get("content") or "")))
    elif isinstance(r.prompt, str):
        s.add(Message(conversation_id=conv.id, role="user", content=r.prompt))
    if r.outputs:
        s.add(Message(conversation_id=conv.id, role="assistant", content=r.outputs[0], completion_id=r.id))
    conv.updated_at = utcnow()
    conv.model = r.model
    if not conv.title and isinstance(r.prompt, list) and r.prompt:
        conv.title = str(r.prompt[-1].get("content") or "")[:60]


# --- conversations --------------------------------------------------------------------------


def conversation_dict(c: Conversation, messages: list[Message] | None = None) -> dict[str, Any]:
    out = {"id": c.id, "object": "conversation", "title": c.title, "model": c.model, "domain": c.domain,
           "created_at": iso(c.created_at), "updated_at": iso(c.updated_at)}  # fmt: skip
    if messages is not None:
        out["messages"] = [
            {
                "role": m.role,
                "content": m.content,
                "completion_id": m.completion_id,
                "created_at": iso(m.created_at),
            }
            for m in messages
        ]
    return out


def _own_conversation(s, conversation_id: str, user_id: int | None) -> Conversation:
    conv = s.get(Conversation, conversation_id)
    if conv is None or conv.user_id != user_id:
        raise APIError(404, f"no conversation {conversation_id!r}", param="conversation_id")
    return conv


def create_conversation(
    store: Store, user_id: int | None, title: str, messages: list[dict[str, str]] | None = None
) -> dict:
    conv = Conversation(id="conv-" + uuid.uuid4().hex, user_id=user_id, title=title)
    with store.write() as s:
        s.add(conv)
        s.flush()
        for m in messages or []:
            s.add(Message(conversation_id=conv.id, role=m["role"], content=m["content"]))
    return get_conversation(store, conv.id, user_id)


def list_conversations(
    store: Store, user_id: int | None, limit: int = 100, domain: str | None = None
) -> list[dict]:
    q = select(Conversation).where(owned_by(Conversation.user_id, user_id))
    if domain is not None:
        q = q.where(Conversation.domain == domain)
    with store.read() as s:
        return [
            conversation_dict(c) for c in s.scalars(q.order_by(Conversation.updated_at.desc()).limit(limit))
        ]


def get_conversation(store: Store, conversation_id: str, user_id: int | None) -> dict:
    with store.read() as s:
        conv = _own_conversation(s, conversation_id, user_id)
        messages = list(
            s.scalars(select(Message).where(Message.conversation_id == conv.id).order_by(Message.id))
        )
        return conversation_dict(conv, messages)


def rename_conversation(store: Store, conversation_id: str, user_id: int | None, title: str) -> dict:
    with store.write() as s:
        conv = _own_conversation(s, conversation_id, user_id)
        conv.title = title
        conv.updated_at = utcnow()
    return get_conversation(store, conversation_id, user_id)


def delete_conversation(store: Store, conversation_id: str, user_id: int | None) -> None:
    with store.write() as s:
        conv = _own_conversation(s, conversation_id, user_id)
        s.query(Message).filter(Message.conversation_id == conv.id).delete()
        s.delete(conv)


def owns_conversation(store: Store, conversation_id: str, user_id: int | None) -> bool:
    with store.read() as s:
        conv = s.get(Conversation, conversation_id)
        return conv is not None and conv.user_id == user_id


# --- feedback -------------------------------------------------------------------------------


def feedback_dict(f: Feedback) -> dict[str, Any]:
    return {"id": f.id, "object": "feedback", "completion_id": f.completion_id,
            "conversation_id": f.conversation_id, "rating": f.rating, "scale": f.scale,
            "positive": is_positive(f.rating, f.scale), "text": f.text,
            "created_at": iso(f.created_at)}  # fmt: skip


def is_positive(rating: int, scale: str) -> bool:
    """A thumb up, or 4-5 stars."""
    return rating == 1 if scale == "thumbs" else rating >= 4


def add_feedback(
    store: Store,
    principal: Principal,
    rating: int,
    text: str = "",
    completion_id: str | None = None,
    conversation_id: str | None = None,
    scale: str | None = None,
) -> dict:
    """Store a rating on the caller's own completion or conversation (404 otherwise): a thumb
    (-1/+1, the default for those values) or stars (1-5; say scale='stars' for one star)."""
    scale = scale or ("thumbs" if rating in (-1, 1) else "stars")
    allowed = (-1, 1) if scale == "thumbs" else (1, 2, 3, 4, 5)
    if scale not in ("thumbs", "stars") or rating not in allowed:
        raise APIError(
            400, f"rating must be -1 or +1 (thumbs) or 1-5 (stars), got {rating} ({scale})", param="rating"
        )
    with store.write() as s:
        if completion_id is not None:
            done = s.get(Completion, completion_id)
            if done is None or done.user_id != principal.user_id:
                raise APIError(404, f"no completion {completion_id!r}", param="completion_id")
        if conversation_id is not None:
            _own_conversation(s, conversation_id, principal.user_id)
        row = Feedback(user_id=principal.user_id, key_id=principal.key_id, completion_id=completion_id,
                       conversation_id=conversation_id, rating=rating, scale=scale, text=text)  # fmt: skip
        s.add(row)
    return feedback_dict(row)


def list_feedback(store: Store, user_id: int | None, everyone: bool = False, limit: int = 100) -> list[dict]:
    q = select(Feedback).order_by(Feedback.id.desc()).limit(limit)
    if not everyone:
        q = q.where(owned_by(Feedback.user_id, user_id))
    with store.read() as s:
        return [feedback_dict(f) for f in s.scalars(q)]


def get_feedback(store: Store, feedback_id: int, user_id: int | None) -> dict:
    with store.read() as s:
        f = s.get(Feedback, feedback_id)
        if f is None or f.user_id != user_id:
            raise APIError(404, f"no feedback {feedback_id}", param="feedback_id")
        return feedback_dict(f)


def feedback_dataset(store: Store, min_rating: int | None = None) -> Iterator[dict[str, Any]]:
    """Rated completions in chat shape, one dict per JSONL row, for fine-tuning.

    {"messages": [...prompt..., {"role": "assistant", "content": output}], "rating": 1,
     "feedback": "...", "model": "...", "completion_id": "..."}
    """
    q = (
        select(Feedback, Completion)
        .join(Completion, Completion.id == Feedback.completion_id)
        .order_by(Feedback.id)
    )
    with store.read() as s:
        for f, c in s.execute(q):
            if min_rating is not None and f.rating < min_rating:
                continue
            prompt = json.loads(c.prompt)
            outputs = json.loads(c.outputs)
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            yield {
                "messages": [*messages, {"role": "assistant", "content": outputs[0] if outputs else ""}],
                "rating": f.rating,
                "scale": f.scale,
                "positive": is_positive(f.rating, f.scale),
                "feedback": f.text,
                "model": c.model,
                "completion_id": c.id,
            }


def count_rows(store: Store, model) -> int:
    with store.read() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0
