"""The seed's limits over a simulated week: never more than 10 questions in an hour, 100 in a
day, or two within 30 s, and a restart (a new Limiter reading the run's file) changes nothing."""

from __future__ import annotations

import bisect
from pathlib import Path

from learn_helpers import SimulatedClock

from semilla.learn.config import LearnConfig
from semilla.learn.limits import DAY, HOUR, Limiter

WEEK = 7 * DAY


def violations(times: list[float], per_hour: int, per_day: int, spacing: float) -> list[str]:
    found = []
    for i, t in enumerate(times):  # times are sorted: count the window ending at each
        if i and t - times[i - 1] < spacing:
            found.append(f"{t}: {t - times[i - 1]} s after the last")
        if i + 1 - bisect.bisect_right(times, t - HOUR) > per_hour:
            found.append(f"{t}: more than {per_hour} in an hour")
        if i + 1 - bisect.bisect_right(times, t - DAY) > per_day:
            found.append(f"{t}: more than {per_day} in a day")
    return found


def eager_week(path: Path, restart_at: float | None) -> list[float]:
    """Every question time of a loop that wants one every 7 simulated seconds for a week, as
    learn asks them: wait for the next slot if it is within one spacing, else come back later."""
    cfg = LearnConfig()
    clock = SimulatedClock()
    start = clock.now()
    limiter = Limiter(path, cfg.questions_per_hour, cfg.questions_per_day, cfg.min_question_spacing_s)
    asked: list[float] = []
    while clock.now() < start + WEEK:
        if restart_at is not None and clock.now() >= start + restart_at:
            limiter, restart_at = Limiter(path, 10, 100, 30.0), None  # what a new process reads
        slot = limiter.next_slot(clock.now())
        if slot - clock.now() <= cfg.min_question_spacing_s and slot < start + WEEK:
            clock.sleep(slot - clock.now())
            limiter.grant(f"q{len(asked)}", clock.now())
            asked.append(clock.now())
            clock.sleep(7)
        else:
            clock.sleep(60)
    return asked


def test_a_week_of_questions_keeps_the_seeds_limits_and_a_restart_changes_nothing(tmp_path: Path):
    cfg = LearnConfig()
    assert (cfg.questions_per_hour, cfg.questions_per_day, cfg.min_question_spacing_s) == (10, 100, 30.0)
    straight = eager_week(tmp_path / "a.json", restart_at=None)
    restarted = eager_week(tmp_path / "b.json", restart_at=3.5 * DAY)
    assert violations(straight, 10, 100, 30.0) == []
    assert len(straight) == 700  # 100 a day is also all the limits allow: no slot is lost either
    assert restarted == straight
    # the run keeps only what the limits need: the last 24 hours
    assert len(Limiter(tmp_path / "b.json", 10, 100, 30.0).granted) == 100


def test_a_question_asked_again_after_a_crash_uses_its_slot(tmp_path: Path):
    limiter = Limiter(tmp_path / "limits.json", 10, 100, 30.0)
    limiter.grant("1-0", 1000.0)
    again = Limiter(tmp_path / "limits.json", 10, 100, 30.0)
    assert again.holds("1-0") and not again.holds("1-1")
    assert again.next_slot(1001.0) == 1030.0
