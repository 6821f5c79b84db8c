"""Usage and cost by model and by user, over time, from the request log: JSON, CSV and
`semilla admin ops usage` agree, costs follow the configured prices, only admins may read it."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from accounts_helpers import chat, login, make_settings, register
from helpers import assert_one_line_error, run_cli
from server_helpers import running_server

from semilla.serve.app import create_app
from semilla.serve.registry import load_models


def test_usage_and_cost_by_model_and_user_as_json_and_csv(tiny_run: Path, tmp_path: Path):
    prices = dict(price_prompt_per_1k=0.5, price_completion_per_1k=2.0, price_per_second=0.01)
    app = create_app(make_settings(tmp_path, **prices), load_models([("tiny", str(tiny_run))]))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        register(client, "ana")
        register(client, "beto")
        ana, beto = login(client, "ana"), login(client, "beto")
        answers = {"ana": [chat(client, ana).json() for _ in range(2)],
                   "beto": [chat(client, beto, max_tokens=3).json() for _ in range(3)]}  # fmt: skip
        assert client.get("/admin/usage", headers=beto).status_code == 403

        by_user = client.get("/admin/usage?by=user", headers=ana).json()
        assert by_user["currency"] == "USD" and by_user["period"] == "day"
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        rows = {r["user"]: r for r in by_user["data"]}
        for name, mine in answers.items():
            row = rows[name]
            assert row["period"] == today and row["requests"] == len(mine)
            prompt = sum(a["usage"]["prompt_tokens"] for a in mine)
            completion = sum(a["usage"]["completion_tokens"] for a in mine)
            assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
            assert row["seconds"] > 0
            cost = prompt / 1000 * 0.5 + completion / 1000 * 2.0 + row["seconds"] * 0.01
            assert row["cost"] == pytest.approx(cost, rel=1e-6)
            assert row["cost_per_generation"] == pytest.approx(cost / len(mine), rel=1e-6)

        by_model = client.get("/admin/usage?by=model&period=hour", headers=ana).json()["data"]
        assert [(r["model"], r["requests"]) for r in by_model] == [("tiny", 5)]
        assert by_model[0]["period"].endswith(":00:00Z")

        r = client.get("/admin/usage?by=user&format=csv", headers=ana)
        assert r.headers["content-type"].startswith("text/csv")
        assert "semilla-usage-by-user.csv" in r.headers["content-disposition"]
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["user"] for row in table] == [row["user"] for row in by_user["data"]]
        assert [float(row["cost"]) for row in table] == [row["cost"] for row in by_user["data"]]
        assert client.get("/admin/usage?by=colour", headers=ana).status_code in (400, 422)

        # the same from the command line: `semilla admin ops usage` prints the export's CSV
        token = ana["Authorization"].removeprefix("Bearer ")
        proc = run_cli("admin", "ops", "usage", "--url", url, "--token", token, "--by", "user")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == r.text.splitlines()
        proc = run_cli("admin", "ops", "alerts", "--url", url, "--token", token)
        assert proc.returncode == 0 and proc.stdout.startswith("health: ok"), proc.stderr
        proc = run_cli("admin", "ops", "usage", "--url", url, "--token", beto["Authorization"][7:])
        assert_one_line_error(proc, "the server answered 403")
