"""/v1/conversations: a user's chat history (list, create, get, rename, delete)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from semilla.serve.accounts import domains, records
from semilla.serve.accounts.deps import Accounts, ConversationsCaller
from semilla.serve.errors import APIError
from semilla.serve.protocol import Body

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class NewConversation(Body):
    title: str = Field("", max_length=200)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=1000)


class Rename(Body):
    title: str | None = Field(None, max_length=200)
    domain: str | None = Field(None, max_length=200)  # a LoRA domain tag; null clears it


@router.get("")
def list_conversations(
    principal: ConversationsCaller,
    accounts: Accounts,
    limit: int = Query(100, ge=1, le=1000),
    domain: str | None = Query(None, max_length=200),
) -> dict:
    data = records.list_conversations(accounts.store, principal.user_id, limit, domain)
    return {"object": "list", "data": data}


@router.post("", status_code=201)
def create_conversation(body: NewConversation, principal: ConversationsCaller, accounts: Accounts) -> dict:
    messages = [m.model_dump() for m in body.messages]
    return records.create_conversation(accounts.store, principal.user_id, body.title, messages)


@router.get("/{conversation_id}")
def get_conversation(conversation_id: str, principal: ConversationsCaller, accounts: Accounts) -> dict:
    accounts.writer.flush()  # the last turn may still be in the queue
    return records.get_conversation(accounts.store, conversation_id, principal.user_id)


@router.patch("/{conversation_id}")
def rename_conversation(
    conversation_id: str, body: Rename, principal: ConversationsCaller, accounts: Accounts, request: Request
) -> dict:
    """Rename it, or tag it with a domain (at most --lora-max-domains distinct ones)."""
    if body.title is None and "domain" not in body.model_fields_set:
        raise APIError(400, "give a title or a domain", param="title")
    tagging = "domain" in body.model_fields_set
    # the domain is checked first: a refused one leaves the title as it was too
    domain = (
        request.app.state.lora_jobs.admit_domain(body.domain) if tagging and body.domain is not None else None
    )
    found = None
    if body.title is not None:
        found = records.rename_conversation(accounts.store, conversation_id, principal.user_id, body.title)
    if tagging:
        found = domains.set_conversation_domain(accounts.store, conversation_id, principal.user_id, domain)
    return found


@router.delete("/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, principal: ConversationsCaller, accounts: Accounts) -> Response:
    records.delete_conversation(accounts.store, conversation_id, principal.user_id)
    return Response(status_code=204)
