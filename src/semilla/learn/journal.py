"""Where the loop keeps its state in a run directory, each file written atomically, so a Ctrl-C
or a kill -9 loses at most the step in flight and a restart resumes the round it stopped in:

    RUN/learn/state.json              the baseline perplexity the gate compares against; the
                                      age grown to and each growth (growth.py)
    RUN/learn/rounds/NNNN.json        one round: questions, answers, signals, lessons, gate
    RUN/learn/limits.json             the questions' times (see limits.py)
    RUN/learn/best/                   the promoted (or grown) model (absent: RUN's own best/ is current)
    --into-adapter DIR                the promoted adapter instead, the model left as it is
    RUN/learn/candidate/              a round's training run, deleted once the gate decided
    RUN/datasets/auto_generated/YYYYMMDD/round_NNNN.jsonl   the teacher's examples, kept forever
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semilla.atomic import atomic_write_text, existing_dir
from semilla.checkpoint import resolve_checkpoint

FINISHED = ("promoted", "rolled_back", "no_gaps", "no_data")


class Journal:
    """The learn/ directory of one run."""

    def __init__(self, run: Path):
        self.run = run
        self.root = run / "learn"
        self.rounds_dir = self.root / "rounds"
        self.rounds_dir.mkdir(parents=True, exist_ok=True)
        self.datasets = run / "datasets" / "auto_generated"

    @property
    def limits_path(self) -> Path:
        return self.root / "limits.json"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def candidate(self) -> Path:
        return self.root / "candidate"

    def current_model(self) -> Path:
        """The checkpoint the loop questions and trains from: the last promoted, else the run's."""
        return existing_dir(self.best) or resolve_checkpoint(self.run)

    def state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.root / "state.json", json.dumps(state, indent=1, ensure_ascii=False))

    def rounds(self) -> list[dict[str, Any]]:
        """Every round, oldest first."""
        return [json.loads(p.read_text()) for p in sorted(self.rounds_dir.glob("[0-9]*.json"))]

    def save_round(self, record: dict[str, Any]) -> None:
        path = self.rounds_dir / f"{record['round']:04d}.json"
        atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False))

    def open_round(self) -> dict[str, Any] | None:
        """The last round if it did not finish (a crash, Ctrl-C or an unreachable teacher)."""
        rounds = self.rounds()
        return rounds[-1] if rounds and rounds[-1]["status"] not in FINISHED else None
