"""Usage and cost: requests, tokens, seconds and their cost by model or by user over time,
computed from the request log the accounts layer already keeps (nothing new is stored).

A generation's cost is priced from the server's settings:

    cost = prompt_tokens / 1000 * price_prompt_per_1k + completion_tokens / 1000 * price_completion_per_1k
           + seconds * price_per_second          # seconds: the generation's own wall time

so a hosted model is priced by its tokens and a local one by the compute it held (CPU- or
GPU-seconds). Rows older than the retention period are already gone from the log.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from semilla.serve.accounts.db import Completion, User

PERIODS = {"hour": "%Y-%m-%dT%H:00:00Z", "day": "%Y-%m-%d"}
GROUPS = ("model", "user")
COLUMNS = ("period", "model", "user", "requests", "prompt_tokens", "completion_tokens", "seconds", "cost",
           "cost_per_generation")  # fmt: skip


@dataclass(frozen=True)
class Prices:
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    per_second: float = 0.0
    currency: str = "USD"

    def cost(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> float:
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000 + (
            seconds * self.per_second
        )


def usage(store, prices: Prices, by: str = "model", period: str = "day", days: float = 7.0) -> list[dict]:
    """One row per period (UTC hour or day) and model or user, oldest first, over the last `days`."""
    assert by in GROUPS and period in PERIODS, (by, period)
    since = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    q = (
        select(Completion.created_at, Completion.model, User.username, Completion.prompt_tokens,
               Completion.completion_tokens, Completion.latency_ms)
        .outerjoin(User, User.id == Completion.user_id)
        .where(Completion.created_at >= since)
    )  # fmt: skip
    rows: dict[tuple[str, str], dict] = {}
    with store.read() as s:
        for created, model, username, prompt, completion, latency_ms in s.execute(q):
            key = (created.strftime(PERIODS[period]), model if by == "model" else (username or "anonymous"))
            row = rows.setdefault(key, {"period": key[0], by: key[1], "requests": 0, "prompt_tokens": 0,
                                        "completion_tokens": 0, "seconds": 0.0})  # fmt: skip
            row["requests"] += 1
            row["prompt_tokens"] += prompt
            row["completion_tokens"] += completion
            row["seconds"] += latency_ms / 1000
    out = [rows[key] for key in sorted(rows)]
    for row in out:
        row["seconds"] = round(row["seconds"], 6)
        row["cost"] = round(prices.cost(row["prompt_tokens"], row["completion_tokens"], row["seconds"]), 8)
        row["cost_per_generation"] = round(row["cost"] / row["requests"], 8)
    return out


def to_csv(rows: list[dict], by: str) -> str:
    """The rows as CSV with a header (period, model or user, requests, tokens, seconds, cost)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [c for c in COLUMNS if c in ("period", by) or c not in GROUPS])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
