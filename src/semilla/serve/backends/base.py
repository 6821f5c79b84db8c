"""The one interface the model routes talk to: a `Backend` answers chats and completions as a
`Generation` (deltas as they come, a `Result` at the end), whatever it is made of.

    backend = state.backend(body.model)       # local model, provider/model or a named route
    gen = backend.chat(messages, call)        # checks the request against the model (400s)
    await gen.start()                         # begins; refusals raise APIError
    async for delta in gen.deltas(): ...      # or: result = await gen.result()

The local engine is `LocalBackend`; remote OpenAI/Anthropic services and fallback chains live in
`remote.py` and `chain.py`. Routes never see a tokenizer or a model config.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from semilla.serve.serving import Generation, GenerationCall


class Backend(ABC):
    """One way of answering requests for a model name."""

    id: str  # the name requests use: 'tiny', 'deepseek/deepseek-chat', 'default'
    owned_by: str = "semilla"

    def __init__(self, id: str):
        self.id = id
        self.created = int(time.time())

    def card(self, admin: bool = False) -> dict:
        """OpenAI's model object for /v1/models (never a key; paths and URLs never)."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}

    @property
    def context_length(self) -> int | None:
        """Tokens of prompt plus answer the model takes; None when unknown or unbounded."""
        return None

    def fits(self, messages: list[dict]) -> bool:
        """Whether a chat of these messages leaves room for an answer (RAG trims passages by it)."""
        return True

    @abstractmethod
    def chat(self, messages: list[dict], call: GenerationCall) -> Generation:
        """A generation answering `messages` ([{"role", "content"}]); 400s for what cannot fit."""

    @abstractmethod
    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> Generation:
        """A generation continuing several texts, or one prompt given as token ids. The
        generation's `texts` are the prompts as text (echo and records use them)."""

    def embedder(self):
        """An embedder of this model's own (see semilla.retrieval.embedders), or None."""
        return None
