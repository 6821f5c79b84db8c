"""What a user has made: run directories and checkpoints under some folders, each with its
steps trained, best validation loss and size on disk (`semilla list`, `semilla info RUN`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from semilla.atomic import existing_dir


def size_on_disk(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_checkpoint(path: Path) -> bool:
    """A semilla checkpoint directory (not a Hugging Face export, whose config differs)."""
    return (path / "model.safetensors").is_file() and "model" in _read_json(path / "config.json")


def run_summary(path: str | os.PathLike) -> dict[str, Any] | None:
    """kind ('run' or 'checkpoint'), steps, best validation loss and size of `path`; None when
    it is neither a run directory (last/ or best/ inside) nor a checkpoint."""
    path = Path(path)
    last, best = existing_dir(path / "last"), existing_dir(path / "best")
    if last or best:
        state = _read_json((last or best) / "trainer_state.json")
        best_val = state.get("best_val_loss")
        return {
            "path": str(path),
            "kind": "run",
            "steps": state.get("step"),
            "best_val_loss": best_val if isinstance(best_val, float) and best_val != float("inf") else None,
            "size_bytes": size_on_disk(path),
        }
    if is_checkpoint(path):
        return {
            "path": str(path),
            "kind": "checkpoint",
            "steps": None,
            "best_val_loss": None,
            "size_bytes": size_on_disk(path),
        }
    return None


def find_runs(roots: list[str]) -> list[dict[str, Any]]:
    """Every run and checkpoint under `roots` (searched recursively, hidden folders skipped),
    in path order. A run's own last/, best/ and data/ are part of it, not listed apart."""
    found = []
    for root in roots:
        for directory, subdirs, _files in os.walk(root):
            summary = run_summary(directory)
            if summary is not None:
                found.append(summary)
                subdirs.clear()
                continue
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found, key=lambda s: s["path"])


def human_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
