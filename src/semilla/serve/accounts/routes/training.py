"""GET /training/runs, /training/runs/{id}/metrics, /training/latest (simpleIA's endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from semilla.serve.accounts import training
from semilla.serve.accounts.deps import Accounts, TrainingCaller

router = APIRouter(prefix="/training", tags=["training"])


@router.get("/runs")
def list_runs(principal: TrainingCaller, accounts: Accounts) -> dict:
    training.index_runs(accounts.store, accounts.settings.runs_dir)
    return {"object": "list", "data": training.list_runs(accounts.store)}


@router.get("/latest")
def latest_run(principal: TrainingCaller, accounts: Accounts) -> dict:
    training.index_runs(accounts.store, accounts.settings.runs_dir)
    return training.latest_run(accounts.store)


@router.get("/runs/{run_id}/metrics")
def run_metrics(
    run_id: str,
    principal: TrainingCaller,
    accounts: Accounts,
    kind: str | None = Query(None, max_length=32),
    since_step: int | None = Query(None, ge=-1, le=2**62),
    limit: int = Query(10_000, ge=1, le=100_000),
) -> dict:
    training.index_runs(accounts.store, accounts.settings.runs_dir)
    return training.run_metrics(accounts.store, run_id, kind, since_step, limit)
