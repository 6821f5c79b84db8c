"""Runtime model switching: an admin loads, unloads and chooses models and reloads the providers
file of a running server (HTTP and `semilla admin model`), without a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
from accounts_helpers import login, make_settings, register
from helpers import clean_env, run_cli
from provider_helpers import write_providers
from server_helpers import running_server

from semilla.serve.app import create_app
from semilla.serve.registry import load_models


def chat(client: httpx.Client, model: str | None, headers: dict) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hola"}], "max_tokens": 2, "temperature": 0}
    return client.post(
        "/v1/chat/completions", json=body | ({"model": model} if model else {}), headers=headers
    )


def test_an_admin_switches_models_without_a_restart(tiny_run: Path, tmp_path: Path):
    providers = write_providers(tmp_path / "providers.yaml", "routes:\n  main: tiny\n")
    app = create_app(make_settings(tmp_path, providers=providers), load_models([("tiny", str(tiny_run))]))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        register(client, "ana")  # the first account is an admin
        register(client, "beto")
        admin, user = login(client, "ana"), login(client, "beto")
        assert client.get("/admin/models", headers=user).status_code == 403
        assert (
            client.post("/admin/models", json={"name": "x", "path": str(tiny_run)}, headers=user).status_code
            == 403
        )

        listing = client.get("/admin/models", headers=admin).json()
        assert [m["id"] for m in listing["data"]] == ["tiny", "main"] and listing["default"] == "tiny"
        assert listing["routes"] == {"main": ["tiny"]}

        # load a second checkpoint, use it, make it the default, unload it
        r = client.post("/admin/models", json={"name": "second", "path": str(tiny_run)}, headers=admin)
        assert r.status_code == 201 and r.json()["id"] == "second"
        assert (
            client.post(
                "/admin/models", json={"name": "second", "path": str(tiny_run)}, headers=admin
            ).status_code
            == 409
        )
        bad = client.post(
            "/admin/models", json={"name": "third", "path": str(tmp_path / "nope")}, headers=admin
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
        for body in (
            {"name": "x", "path": "a\u0000b"},
            {"name": "x/y", "path": str(tiny_run)},
            {"name": "", "path": "p"},
        ):
            assert client.post("/admin/models", json=body, headers=admin).status_code == 400, body
        assert client.post("/model", json={"model_name": "a\u0000b"}, headers=admin).status_code == 400
        assert chat(client, "second", user).json()["model"] == "second"
        assert client.post("/admin/models/default", json={"model": "second"}, headers=admin).json() == {
            "default": "second"
        }
        assert chat(client, None, user).json()["model"] == "second"
        assert client.delete("/admin/models/second", headers=admin).status_code == 204
        assert chat(client, "second", user).status_code == 404
        assert client.delete("/admin/models/second", headers=admin).status_code == 404

        # simpleIA's alias: POST /model {"model_name"} (a name, or a checkpoint path) and GET /model
        r = client.post("/model", json={"model_name": "main"}, headers=admin)
        assert r.status_code == 200 and r.json()["model"] == "main"
        assert client.get("/model", headers=user).json()["model"] == "main"
        assert chat(client, None, user).json()["model"] == "tiny"  # the route answered with its link

        # reload the providers file: a new route appears; a broken file changes nothing
        write_providers(tmp_path / "providers.yaml", "routes:\n  main: tiny\n  other: tiny\n")
        r = client.post("/admin/models/reload", headers=admin)
        assert r.status_code == 200 and r.json()["routes"] == ["main", "other"]
        assert chat(client, "other", user).status_code == 200
        body = {
            "model": "other",
            "messages": [{"role": "user", "content": "Hola"}],
            "max_tokens": 2,
            "stream": True,
        }
        r = client.post("/v1/chat/completions", json=body, headers=user)  # a route's local link streams too
        assert r.headers["x-semilla-provider"] == "tiny" and r.text.endswith("data: [DONE]\n\n")
        write_providers(tmp_path / "providers.yaml", "routes:\n  main: nowhere\n")
        r = client.post("/admin/models/reload", headers=admin)
        assert (
            r.status_code == 400
            and "providers.yaml:2: 'nowhere' is no model or provider" in r.json()["error"]["message"]
        )
        assert chat(client, "other", user).status_code == 200

        # the same from a terminal
        env = clean_env(SEMILLA_API_KEY=admin["Authorization"].removeprefix("Bearer "))
        r = run_cli("admin", "model", "--url", url, "load", "cli-model", str(tiny_run), env=env)
        assert r.returncode == 0, r.stderr
        assert "cli-model" in [m["id"] for m in client.get("/v1/models", headers=user).json()["data"]]
        r = run_cli("admin", "model", "--url", url, "unload", "nope", env=env)
        assert r.returncode == 2 and "no local model 'nope'" in r.stderr
        audit = client.get("/admin/audit", params={"action": "model.load"}, headers=admin).json()["data"]
        assert {row["target"] for row in audit} == {"second", "cli-model"}
