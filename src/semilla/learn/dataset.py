"""The teacher's lessons as chat JSONL rows: near-duplicates dropped (ROUGE-L, as Self-Instruct
does), provenance kept on every row, each round's file appended under the run and never
overwritten."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from semilla.atomic import atomic_write_text
from semilla.learn.gaps import lcs_length
from semilla.learn.questions import words


class NearDuplicates:
    """The examples kept so far (question and answer as one text); `add` keeps an example only
    if its ROUGE-L against every kept one is at most `threshold`."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.kept: list[tuple[list[str], Counter]] = []

    def add(self, text: str) -> bool:
        wa = words(text)
        if not wa:
            return False
        ca = Counter(wa)
        for wb, cb in self.kept:
            common = sum((ca & cb).values())  # an upper bound of the LCS: most pairs stop here
            close = 2 * common / (len(wa) + len(wb)) > self.threshold
            if close and 2 * lcs_length(wa, wb) / (len(wa) + len(wb)) > self.threshold:
                return False
        self.kept.append((wa, ca))
        return True


def example_text(row: dict[str, Any]) -> str:
    return " ".join(m["content"] for m in row["messages"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def lesson_rows(lesson: dict[str, Any], question: str, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """The gap question with the teacher's reference answer, then the teacher's examples."""
    pairs = [(question, lesson["answer"])] + [(e["question"], e["answer"]) for e in lesson["examples"]]
    return [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "provenance": {**provenance, "gap_question": question},
        }
        for q, a in pairs
    ]


def write_round_dataset(directory: Path, round_number: int, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` to directory/round_NNNN.jsonl atomically. A file of that name with other
    content is never replaced: the rows go to round_NNNN_2.jsonl (and so on) instead."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for n in range(1, 1000):
        path = directory / (
            f"round_{round_number:04d}.jsonl" if n == 1 else f"round_{round_number:04d}_{n}.jsonl"
        )
        if not path.exists():
            atomic_write_text(path, text)
            return path
        if path.read_text(encoding="utf-8") == text:  # written before a crash: the same rows
            return path
    raise FileExistsError(f"{directory} holds 999 datasets of round {round_number}")
