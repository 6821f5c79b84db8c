"""Uploaded or local files -> document text: UTF-8 text only (plain, Markdown, code, CSV, JSON)."""

from __future__ import annotations

from semilla.errors import SemillaError


def file_text(name: str, data: bytes) -> str:
    """The text of a file; a binary file (NUL bytes, not UTF-8) is refused naming the file."""
    if b"\x00" in data:
        raise SemillaError(
            f"{name}: a binary file (it contains NUL bytes); only UTF-8 text files can be added"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SemillaError(
            f"{name}: not UTF-8 text (byte {e.start}); only UTF-8 text files can be added"
        ) from None
    if not text.strip():
        raise SemillaError(f"{name}: the file is empty")
    return text
