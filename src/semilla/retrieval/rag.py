"""Grounding a chat in retrieved passages: the passages enter the conversation as one system
message with numbered source markers, and the answer carries the list of sources.

    hits = books.search(row, question, k=4)
    messages = grounded_messages(messages, hits)   # [system: "[1] (doc #0) ...", *messages]
    sources(hits)                                  # [{"id": 1, "document_id", "chunk", "score", "snippet"}]
"""

from __future__ import annotations

from typing import Any

from semilla.retrieval.collections import SearchHit

INSTRUCTION = (
    "Answer from these sources and cite them by number, like [1]. If they do not hold the answer, say so."
)
SNIPPET_CHARS = 200


def last_user_text(messages: list[dict[str, str]]) -> str:
    """The question to retrieve for: the last user message."""
    return next(
        (m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"].strip()), ""
    )


def grounded_messages(messages: list[dict[str, str]], hits: list[SearchHit]) -> list[dict[str, str]]:
    """`messages` with the passages as a system message in front (marked [1], [2], ...)."""
    if not hits:
        return messages
    passages = "\n\n".join(
        f"[{i}] ({h.document_id} #{h.chunk}) {h.text}" for i, h in enumerate(hits, start=1)
    )
    return [{"role": "system", "content": f"{INSTRUCTION}\n\n{passages}"}, *messages]


def sources(hits: list[SearchHit]) -> list[dict[str, Any]]:
    """What the response shows under the answer: each marker's document, chunk, score and snippet."""
    return [
        {
            "id": i,
            "document_id": h.document_id,
            "chunk": h.chunk,
            "score": h.score,
            "snippet": " ".join(h.text.split())[:SNIPPET_CHARS],
        }  # fmt: skip
        for i, h in enumerate(hits, start=1)
    ]
