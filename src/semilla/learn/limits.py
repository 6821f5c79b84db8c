"""The seed's safety limits on self-questioning: at most `per_hour` questions in any hour,
`per_day` in any 24 hours, and `spacing` seconds between two. The times of the granted
questions are kept in the run (limits.json), so a restart continues the same windows; each
grant names its question, so a question re-asked after a crash uses the slot it already had.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from semilla.atomic import atomic_write_text

HOUR, DAY = 3600.0, 86400.0


class Stopped(Exception):
    """The clock's stop event was set while it slept."""


class Clock:
    """Wall time and sleeping, which a set `stop` event cuts short (Stopped); tests inject a
    simulated clock."""

    def __init__(self, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped


class Limiter:
    """Question slots under the three limits, persisted in `path`."""

    def __init__(self, path: Path, per_hour: int, per_day: int, spacing: float):
        self.path, self.per_hour, self.per_day, self.spacing = path, per_hour, per_day, spacing
        # [[time, question id], ...] of the last 24 hours, oldest first
        self.granted: list[list] = json.loads(path.read_text())["granted"] if path.is_file() else []

    def holds(self, question_id: str) -> bool:
        return any(qid == question_id for _, qid in self.granted)

    def next_slot(self, now: float) -> float:
        """The earliest time >= now at which one more question keeps every limit."""
        times = [t for t, _ in self.granted if t > now - DAY]
        slot = now
        if times:
            slot = max(slot, times[-1] + self.spacing)
        if len(times) >= self.per_day:
            slot = max(slot, times[-self.per_day] + DAY)
        last_hour = [t for t in times if t > slot - HOUR]
        if len(last_hour) >= self.per_hour:
            slot = max(slot, last_hour[-self.per_hour] + HOUR)
        return slot

    def grant(self, question_id: str, now: float) -> None:
        """Record a question asked at `now` (call only when next_slot(now) <= now)."""
        assert self.next_slot(now) <= now, "a question outside the limits"
        self.granted = [g for g in self.granted if g[0] > now - DAY] + [[now, question_id]]
        atomic_write_text(self.path, json.dumps({"granted": self.granted}))

    def describe(self, now: float) -> str:
        times = [t for t, _ in self.granted]
        hour = sum(t > now - HOUR for t in times)
        day = sum(t > now - DAY for t in times)
        return (
            f"{hour} of {self.per_hour} questions this hour, {day} of {self.per_day} today, "
            f"{self.spacing:g} s apart"
        )
