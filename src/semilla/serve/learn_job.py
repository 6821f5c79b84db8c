"""The self-learning loop as a server job (admins, /admin/learn): one loop at a time, in a thread,
on a run directory under the server's runs_dir; its progress, and Prometheus counters.

The loop's journal is the truth: the counters grow by what `learn_stats` says changed after each
round, so a round resumed after a restart or an unreachable teacher is never counted twice. A
request never names a file or a secret: topics and templates files, the adapter directory, the
API key's variable and the device are the server's (the CLI has them).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from semilla.errors import CheckpointError, SemillaError
from semilla.serve.errors import APIError

log = logging.getLogger(__name__)

LEARN_QUESTIONS = Counter("semilla_learn_questions", "Questions the learning loop asked its model")
LEARN_GAPS = Counter("semilla_learn_gaps", "Answers the learning loop judged gaps")
LEARN_DATASETS = Counter("semilla_learn_datasets", "Datasets of teacher examples the learning loop wrote")
LEARN_EXAMPLES = Counter("semilla_learn_examples", "Teacher examples kept for training")
LEARN_ROUNDS = Counter(
    "semilla_learn_rounds", "Rounds the gate decided, by outcome (promoted, rolled_back)", ["outcome"]
)
LEARN_RUNNING = Gauge("semilla_learn_running", "1 while a learning loop runs")
TOTALS = {  # learn_stats key -> its counter
    "questions_asked": LEARN_QUESTIONS,
    "gaps_detected": LEARN_GAPS,
    "datasets_generated": LEARN_DATASETS,
    "examples_generated": LEARN_EXAMPLES,
    "promotions": LEARN_ROUNDS.labels("promoted"),
    "rollbacks": LEARN_ROUNDS.labels("rolled_back"),
}
SERVER_ONLY = ("topics", "templates", "into_adapter", "teacher_api_key_env", "device")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class LearnJob:
    """One loop the server runs: its settings, what it has done, and how it ended."""

    run: Path
    rounds: int
    forever: bool
    settings: dict[str, Any]
    state: str = "running"  # running | stopping | finished | stopped | failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str = ""
    done: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    totals: dict[str, int] = field(default_factory=dict)  # learn_stats' totals as last counted

    def describe(self) -> dict[str, Any]:
        teacher = {k: self.settings[k] for k in ("teacher_api", "teacher_model") if k in self.settings}
        return {"run": self.run.name, "state": self.state, "rounds": self.rounds, "forever": self.forever,
                "started": self.started, "finished": self.finished, "error": self.error,
                "rounds_done": self.done, **teacher}  # fmt: skip


def run_dir(runs_dir: str, name: str) -> Path:
    """The run `name` under runs_dir (a plain name: never a path out of it), or a 404."""
    from semilla.checkpoint import resolve_checkpoint

    if not RUN_NAME.fullmatch(name):
        raise APIError(
            400, f"run must be a run directory's name under the runs directory, got {name!r}", param="run"
        )
    path = Path(runs_dir) / name
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        raise APIError(404, f"no trained run {name!r} in the runs directory", param="run") from None
    return path


def learn_settings(teacher: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """LearnConfig fields from a request: the teacher shorthand, then the fields given; a 400
    naming every problem."""
    from semilla.learn.config import LearnConfig
    from semilla.learn.teacher import provider_settings

    refused = [k for k in settings if k in SERVER_ONLY]
    if refused:
        raise APIError(400, f"set on the server, not by a request: {', '.join(refused)}", param="settings")
    unknown = sorted(set(settings) - set(LearnConfig.__dataclass_fields__))
    if unknown:
        raise APIError(400, f"unknown learn settings: {', '.join(unknown)}", param="settings")
    try:
        values = {**(provider_settings(teacher) if teacher else {}), **settings}
        LearnConfig(**values).validate()
    except (SemillaError, ValueError, TypeError) as e:
        raise APIError(400, str(e), param="settings") from None
    return values


class LearnJobs:
    """The server's learning loop: at most one runs; the last one's status is kept."""

    def __init__(self, runs_dir: str):
        self.runs_dir = runs_dir
        self.job: LearnJob | None = None
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        """The job (None before the first) and its run's totals from the journal."""
        from semilla.learn import learn_stats

        job = self.job
        if job is None:
            return {"job": None, "stats": None}
        try:
            stats = learn_stats(job.run)
        except SemillaError:  # no round journaled yet
            stats = None
        return {"job": job.describe(), "stats": stats}

    def start(
        self, name: str, teacher: str | None, settings: dict[str, Any], rounds: int, forever: bool
    ) -> dict:
        path = run_dir(self.runs_dir, name)
        values = learn_settings(teacher, settings)
        with self.lock:
            if self.job is not None and self.job.state in ("running", "stopping"):
                raise APIError(409, f"a learning loop already runs on {self.job.run.name}: stop it first")
            job = LearnJob(path, rounds, forever, values, totals=journal_totals(path))
            self.job = job
        LEARN_RUNNING.set(1)
        threading.Thread(target=self._run, args=(job,), name="semilla-learn", daemon=True).start()
        return self.status()

    def stop(self) -> dict[str, Any]:
        """Ask the loop to stop: at once while it waits, else after the round in flight."""
        with self.lock:
            job = self.job
            if job is None or job.state not in ("running", "stopping"):
                raise APIError(409, "no learning loop is running")
            job.state = "stopping"
            job.stop.set()
        return self.status()

    def _run(self, job: LearnJob) -> None:
        from semilla.learn import learn

        try:
            learn(job.run, rounds=job.rounds, forever=job.forever, wait=True, stop=job.stop,
                  on_round=lambda summary: self._round_done(job, summary), **job.settings)  # fmt: skip
            job.state = "stopped" if job.stop.is_set() else "finished"
        except Exception as e:  # the server stays up; the job says what happened
            log.exception("learning loop on %s failed", job.run)
            job.state, job.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
        finally:
            count_new(job)
            job.finished = time.time()
            LEARN_RUNNING.set(0)

    def _round_done(self, job: LearnJob, summary: dict[str, Any]) -> None:
        job.done.append(summary)
        count_new(job)
        log.info("learning loop on %s: round %d %s", job.run.name, summary["round"], summary["status"])


def journal_totals(run: Path) -> dict[str, int]:
    from semilla.learn import learn_stats

    try:
        stats = learn_stats(run)
    except SemillaError:
        return dict.fromkeys(TOTALS, 0)
    return {k: stats[k] for k in TOTALS}


def count_new(job: LearnJob) -> None:
    """Grow the counters by what the journal gained since they last grew."""
    now = journal_totals(job.run)
    for key, counter in TOTALS.items():
        if now[key] > job.totals.get(key, 0):
            counter.inc(now[key] - job.totals.get(key, 0))
    job.totals = now
