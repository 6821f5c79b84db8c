"""What the loop has done in a run, read from its journal: `semilla learn stats RUN`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilla.errors import SemillaError
from semilla.learn.journal import Journal
from semilla.learn.loop import summary


def learn_stats(run: str | Path) -> dict[str, Any]:
    """Totals (questions, gaps, datasets, examples, promotions, rollbacks) and one summary per round."""
    run = Path(run)
    if not (run / "learn" / "rounds").is_dir():
        raise SemillaError(f"{run} has no self-learning rounds yet (run: semilla learn {run} ...)")
    journal = Journal(run)
    rounds = journal.rounds()
    per_round = [summary(r) for r in rounds]
    asked = [q for r in rounds for q in r["questions"] if "answer" in q]
    return {
        "run": str(run),
        "rounds": len(rounds),
        "questions_asked": len(asked),
        "gaps_detected": sum(q["gap"] for q in asked),
        "teacher_invalid": sum(q.get("lesson", {}).get("status") == "invalid" for q in asked),
        "datasets_generated": sum(bool(r.get("dataset")) for r in rounds),
        "examples_generated": sum(r.get("examples", 0) for r in rounds),
        "promotions": sum(r["status"] == "promoted" for r in rounds),
        "rollbacks": sum(r["status"] == "rolled_back" for r in rounds),
        "train_steps": sum(r.get("compute", {}).get("train_steps", 0) for r in rounds),
        "growths": journal.state().get("growths", []),
        "per_round": per_round,
    }
