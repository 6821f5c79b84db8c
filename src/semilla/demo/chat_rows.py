"""Chat-format training rows from the bundled Quijote excerpt (public domain), for the demo.

The novel's dialogue is turned into conversations: consecutive spoken lines of a scene become
alternating user and assistant turns, three exchanges a row, so a model trained on them holds
a short conversation and ends its turns. Everything comes from Cervantes' text; nothing is
downloaded or invented.

    python -m semilla.demo.chat_rows > chat.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

QUIJOTE = Path(__file__).with_name("quijote.txt")
TURNS = 6  # three exchanges: user, assistant, user, assistant, user, assistant
MAX_CHARS = 200  # a turn longer than this is cut at its last sentence end before it


def paragraphs(text: str) -> list[str]:
    """Paragraphs of the text with their line breaks joined."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def spoken(paragraph: str) -> str | None:
    """The words of a dialogue paragraph ('—...'), without the narrator's '—dijo ...—' asides,
    at most MAX_CHARS long; None for narration."""
    if not paragraph.startswith("—"):
        return None
    parts = paragraph[1:].split("—")
    words = " ".join(p.strip() for p in parts[::2] if p.strip())  # odd parts are the asides
    words = re.sub(r"([?!])\s*\.", r"\1", words)  # the aside's full stop after a question
    words = re.sub(r"\s+([.,;:])", r"\1", words)
    if len(words) > MAX_CHARS:
        cut = max(words.rfind(end, 0, MAX_CHARS) for end in ".!?")
        words = words[: cut + 1] if cut > 40 else words[:MAX_CHARS].rsplit(" ", 1)[0] + "..."
    return words or None


def chat_rows(text: str) -> Iterator[dict]:
    """Conversations of TURNS consecutive spoken lines, one row per starting line of a scene
    (a run of dialogue paragraphs without narration between them)."""
    scene: list[str] = []
    scenes: list[list[str]] = []
    for paragraph in paragraphs(text):
        line = spoken(paragraph)
        if line is None:
            if len(scene) >= 2:
                scenes.append(scene)
            scene = []
        else:
            scene.append(line)
    if len(scene) >= 2:
        scenes.append(scene)
    for lines in scenes:
        for start in range(0, max(1, len(lines) - 1), 2):
            window = lines[start : start + TURNS]
            window = window[: len(window) // 2 * 2]  # end on the assistant's turn
            roles = ["user", "assistant"] * (len(window) // 2)
            yield {"messages": [{"role": r, "content": c} for r, c in zip(roles, window, strict=True)]}


def main() -> None:
    for row in chat_rows(QUIJOTE.read_text(encoding="utf-8")):
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
