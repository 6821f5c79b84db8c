"""Documents into overlapping chunks of characters, and the hash that deduplicates them.

chunk_text("abcdefghij", size=4, overlap=1) -> ["abcd", "defg", "ghij"]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from semilla.errors import SemillaError


@dataclass(frozen=True)
class ChunkConfig:
    """How a collection cuts its documents (Open WebUI's defaults: 1000 characters, 100 shared)."""

    size: int = 1000  # characters per chunk
    overlap: int = 100  # characters each chunk repeats from the one before

    def validate(self) -> ChunkConfig:
        problems = []
        if self.size < 1:
            problems.append(f"chunk size must be >= 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            problems.append(f"chunk overlap must be in [0, chunk size), got {self.overlap}")
        if problems:
            raise SemillaError("; ".join(problems))
        return self


def chunk_text(text: str, cfg: ChunkConfig = ChunkConfig()) -> list[str]:
    """Windows of at most `cfg.size` characters, each starting about `overlap` before the last
    one's end; blank windows are dropped.

    Words stay whole when they can: a window ends at the last space or newline of its final
    fifth, and the next one starts after the first space or newline of its overlap.
    """
    chunks, start = [], 0
    while start < len(text):
        end = min(start + cfg.size, len(text))
        if end < len(text):
            cut = max(
                text.rfind(" ", start + cfg.size * 4 // 5, end),
                text.rfind("\n", start + cfg.size * 4 // 5, end),
            )
            if cut > start:
                end = cut
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        nxt = max(start + 1, end - cfg.overlap)
        spaces = [i for i in (text.find(" ", nxt, end), text.find("\n", nxt, end)) if i >= 0]
        start = min(spaces) + 1 if spaces and min(spaces) + 1 < end else nxt
    return chunks


def content_hash(text: str) -> str:
    """SHA-256 of the text (UTF-8): two documents with the same hash are the same document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
