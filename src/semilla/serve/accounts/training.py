"""Training runs in the store, indexed from the run directories the trainer writes.

The trainer appends one JSON row per logging interval to `<run>/metrics.jsonl` and knows
nothing of the server (lower layers never import higher ones). The server reads each run's new
bytes into `training_runs` / `training_metrics` whenever /training/* is asked, so a running
run is seen live, a finished one is kept after its directory is gone, and a crashed trainer
never leaves the database half-written.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from semilla.serve.accounts.db import Store, TrainingMetric, TrainingRun
from semilla.serve.errors import APIError

_index_lock = threading.Lock()


def find_run_dirs(runs_dir: str) -> list[Path]:
    root = Path(runs_dir)
    if (root / "metrics.jsonl").is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/metrics.jsonl"))


def index_runs(store: Store, runs_dir: str) -> int:
    """Read the new lines of every run's metrics.jsonl into the store; returns rows added."""
    added = 0
    with _index_lock:
        for run_dir in find_run_dirs(runs_dir):
            added += _index_run(store, run_dir)
    return added


def _index_run(store: Store, run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    run_id = run_dir.name
    size = path.stat().st_size
    with store.read() as s:
        run = s.get(TrainingRun, run_id)
        offset = run.indexed_bytes if run is not None and run.path == str(run_dir) else 0
    if run is not None and offset == size:
        return 0
    with open(path, "rb") as f:
        if offset:  # indexed up to a line end; not one now: the file was replaced, read it again
            f.seek(offset - 1)
            if offset > size or f.read(1) != b"\n":
                offset = 0
        f.seek(offset)
        chunk = f.read(size - offset)
    complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for next time
    rows = []
    for line in complete.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            step, t = int(row.pop("step")), float(row.pop("time"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        rows.append(TrainingMetric(run_id=run_id, kind=str(row.pop("kind", "train")), step=step, time=t,
                                   values=json.dumps(row)))  # fmt: skip
    with store.write() as s:
        run = s.get(TrainingRun, run_id)
        if run is None:
            run = TrainingRun(id=run_id, path=str(run_dir), indexed_bytes=0, step=0)
            s.add(run)
            s.flush()  # the run row before its metrics (foreign key)
        elif offset == 0:
            s.query(TrainingMetric).filter(TrainingMetric.run_id == run_id).delete()
        run.path = str(run_dir)
        run.indexed_bytes = offset + len(complete)
        s.add_all(rows)
        if rows:
            run.started_at = run.started_at or rows[0].time
            run.updated_at = rows[-1].time
            run.step = max(run.step or 0, *(r.step for r in rows))
    return len(rows)


def _run_dict(s, run: TrainingRun) -> dict[str, Any]:
    last = {}
    for kind in ("train", "eval"):
        m = s.scalar(
            select(TrainingMetric)
            .where(TrainingMetric.run_id == run.id, TrainingMetric.kind == kind)
            .order_by(TrainingMetric.id.desc())
            .limit(1)
        )
        if m is not None:
            last[kind] = {"step": m.step, **json.loads(m.values)}
    n = s.scalar(select(func.count()).select_from(TrainingMetric).where(TrainingMetric.run_id == run.id))
    return {"id": run.id, "object": "training.run", "path": run.path, "started_at": run.started_at,
            "updated_at": run.updated_at, "step": run.step, "metrics_rows": n, "last": last}  # fmt: skip


def list_runs(store: Store) -> list[dict]:
    with store.read() as s:
        runs = s.scalars(select(TrainingRun).order_by(TrainingRun.updated_at.desc().nullslast()))
        return [_run_dict(s, r) for r in runs]


def latest_run(store: Store) -> dict:
    runs = list_runs(store)
    if not runs:
        raise APIError(404, "no training runs recorded yet", code="no_runs")
    return runs[0]


def run_metrics(
    store: Store, run_id: str, kind: str | None = None, since_step: int | None = None, limit: int = 10_000
) -> dict:
    with store.read() as s:
        if s.get(TrainingRun, run_id) is None:
            raise APIError(404, f"no training run {run_id!r}", param="run_id")
        q = select(TrainingMetric).where(TrainingMetric.run_id == run_id)
        if kind:
            q = q.where(TrainingMetric.kind == kind)
        if since_step is not None:
            q = q.where(TrainingMetric.step > since_step)
        rows = s.scalars(q.order_by(TrainingMetric.id).limit(limit))
        data = [{"kind": m.kind, "step": m.step, "time": m.time, **json.loads(m.values)} for m in rows]
    return {"object": "list", "run_id": run_id, "data": data}
