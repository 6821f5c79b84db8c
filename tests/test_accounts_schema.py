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
@pytest.mark.timeout(600)  # ~5,800 requests: about 70 s on a 2-core machine busy with other work
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
        # --generation-deterministic: the same cases every run, so a failure is never a fluke of
        # the seed
        result = subprocess.run(
            [str(cli), "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
             "--generation-deterministic", *excluded, "-H", f"Authorization: {token}", "--no-color", "--workers", "1"],
            capture_output=True, text=True, timeout=540, env=os.environ | {"SCHEMATHESIS_HOOKS": ""},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
