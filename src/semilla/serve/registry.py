"""The served models: which checkpoints, under which ids, and how each is doing."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from semilla.api import LanguageModel, load
from semilla.checkpoint import resolve_checkpoint
from semilla.errors import CheckpointError, SemillaError
from semilla.models import count_parameters

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    id: str
    path: str
    lm: LanguageModel
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def parameters(self) -> int:
        return count_parameters(self.lm.model)

    def card(self, with_path: bool = False) -> dict:
        """OpenAI's model object plus semilla's shape details (the path only for admins)."""
        cfg = self.lm.model.config
        card = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "semilla",
            "context_length": self.lm.context_length if cfg.arch != "lstm" else None,
            "parameters": self.parameters,
            "meta": {
                "arch": cfg.arch,
                "family": cfg.family,
                "tokenizer": self.lm.tokenizer.kind,
                "vocab_size": cfg.vocab_size,
                "n_layer": cfg.n_layer,
                "n_embd": cfg.n_embd,
            },
        }
        if with_path:
            card["meta"]["path"] = self.path
        return card


def model_specs(paths: list[str], names: list[str] | None = None) -> list[tuple[str, str]]:
    """(id, path) pairs. A path may be written NAME=PATH; otherwise the id is the directory's
    name (a run directory's own name rather than 'best')."""
    names = list(names or [])
    specs = []
    for i, raw in enumerate(paths):
        name, sep, path = raw.partition("=")
        if not sep or not name or os.sep in name:
            name, path = "", raw
        if i < len(names) and names[i]:
            name = names[i]
        if not name:
            p = Path(path).resolve()
            name = p.parent.name if p.name in ("best", "last") else p.name
        specs.append((name, path))
    ids = [n for n, _ in specs]
    dupes = sorted({n for n in ids if ids.count(n) > 1})
    if dupes:
        raise SemillaError(f"two models would be served as {', '.join(dupes)}: give them --name")
    return specs


def discover(models_dir: str) -> list[str]:
    """Checkpoints (or run directories) directly inside `models_dir`, sorted by name."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        try:
            resolve_checkpoint(child)
        except CheckpointError:
            continue
        found.append(str(child))
    return found


def load_models(
    specs: list[tuple[str, str]], device: str | None = None, dtype: str = "auto"
) -> dict[str, ServedModel]:
    """Load every model; a broken checkpoint is a start-up error naming it."""
    served = {}
    for name, path in specs:
        start = time.perf_counter()
        lm = load(path, device=device, dtype=dtype)
        served[name] = ServedModel(name, str(resolve_checkpoint(path)), lm)
        log.info("loaded %s from %s in %.1f s", name, path, time.perf_counter() - start)
    return served
