"""schemathesis against the whole served OpenAPI document of the real server (the tiny model's
routes included): a few hundred generated requests, authenticated as an admin, zero 5xx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from accounts_helpers import build_app, login, make_settings, register, serve

EXCLUDED = ["/auth/logout"]  # would end the session the run authenticates with


@pytest.mark.slow
@pytest.mark.timeout(600)  # every operation of the API, 25 examples each: ~200 s on a busy 2-core machine
def test_no_server_errors_on_generated_requests(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        register(c, "root")
        token = login(c, "root")["Authorization"]
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/generate", "/predict"} <= set(
            paths
        )
        cli = Path(sys.executable).parent / "schemathesis"
        excluded = [arg for path in EXCLUDED for arg in ("--exclude-path", path)]
        result = subprocess.run(
            [str(cli), "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
             *excluded, "-H", f"Authorization: {token}", "--no-color", "--workers", "1"],
            capture_output=True, text=True, timeout=540, env=os.environ | {"SCHEMATHESIS_HOOKS": ""},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
