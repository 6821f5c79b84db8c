"""`AdapterBackend`: a LoRA adapter served under its own name on its base model's engine.

A request whose `model` names the adapter runs on the base model's worker with the adapter
applied to its rows only (models/adapter_bank.py): rows of the base model and of other
adapters share the same batches. /v1/models lists it with its `parent`, as vLLM does.
"""

from __future__ import annotations

from semilla.serve.backends.local import LocalBackend


class AdapterBackend(LocalBackend):
    """Base model `base`'s engine worker, every request with adapter `name`."""

    def __init__(self, name: str, path: str, base: LocalBackend):
        super().__init__(base.served, base.engine)
        self.id, self.adapter, self.path, self.parent = name, name, path, base.id

    def card(self, admin: bool = False) -> dict:
        card = {"id": self.id, "object": "model", "created": self.created, "owned_by": "semilla",
                "parent": self.parent}  # fmt: skip
        if admin:
            card["meta"] = {"path": self.path, "kind": "lora"}
        return card

    def embedder(self):
        """None: an embedding of the base model's would not be this adapter's."""
        return None
