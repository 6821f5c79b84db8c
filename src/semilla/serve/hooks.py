"""The seam between the model routes and the accounts layer.

The model routes call these hooks around every request; the default `ServerHooks` is an open
server (everyone is anonymous, nothing cached, nothing recorded). The accounts layer
(`semilla.serve.accounts`) installs a subclass that authenticates, rate-limits, caches,
filters and records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request


@dataclass(frozen=True)
class Principal:
    """Who is calling: an account (by password token or cookie), an API key, or nobody."""

    kind: str = "anonymous"  # 'anonymous' | 'user' | 'key'
    role: str = "anonymous"  # 'admin' | 'user' | 'anonymous'
    user_id: int | None = None
    key_id: int | None = None
    name: str = "anonymous"
    scopes: tuple[str, ...] = ()

    @property
    def scope(self) -> str:
        """What separates one caller's cache entries, limits and records from another's."""
        if self.key_id is not None:
            return f"key:{self.key_id}"
        if self.user_id is not None:
            return f"user:{self.user_id}"
        return "anonymous"


ANONYMOUS = Principal()


@dataclass
class CompletionRecord:
    """One finished completion, as the accounts layer stores it (feedback refers to `id`)."""

    id: str
    model: str
    route: str  # 'chat' | 'completions' | 'generate' | 'predict'
    prompt: Any  # the messages (chat) or the prompt text
    outputs: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    conversation_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ServerHooks:
    """Open server: no authentication, no limits, no cache, nothing recorded."""

    async def authorize(self, request: Request, scope: str = "models") -> Principal:
        """Who the caller is; raise APIError 401/403/429 to refuse. `scope` names the route kind."""
        return ANONYMOUS

    def serves_anonymous(self) -> bool:
        """Whether a caller with no credential may use the model routes now (open mode)."""
        return True

    def screen_prompt(self, principal: Principal, text: str) -> None:
        """Raise APIError(400, code='content_filter') to refuse a prompt."""

    screens_output = False  # whether screen_output can ever say True (then outputs are judged)

    def screen_output(self, text: str) -> bool:
        """True when an output must be withheld (finish_reason 'content_filter')."""
        return False

    def cache_get(self, principal: Principal, material: dict[str, Any]) -> Any | None:
        """A stored result for a deterministic request, or None. `material` is JSON-able."""
        return None

    def cache_put(self, principal: Principal, material: dict[str, Any], result: Any, size: int) -> None:
        """Store the result of a deterministic request (`size`: its approximate bytes)."""

    def record_tokens(self, principal: Principal, tokens: int) -> None:
        """Count generated tokens against the caller's tokens-per-minute budget."""

    def record_completion(self, principal: Principal, record: CompletionRecord) -> None:
        """Store a finished completion (request log, conversation history, feedback target).
        Called on the event loop unless record.conversation_id is set (then in a worker thread,
        and the turn is stored when this returns): without a conversation it must not block."""
