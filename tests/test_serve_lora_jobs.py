"""The chat seed's flow on a real server: a conversation becomes a LoRA adapter in a
background job (a real `semilla finetune` child process), owner-only, limited, cancellable;
the result is served, downloadable as .safetensors and a PEFT zip, and counted."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import pytest
from accounts_helpers import login, make_settings, register
from lora_helpers import tiny_base
from safetensors.torch import load as load_safetensors
from server_helpers import running_server, wait_until

from semilla.serve.app import create_app
from semilla.serve.registry import load_models

CHAT = [
    {"role": "user", "content": "what is a fever?"},
    {"role": "assistant", "content": "a body temperature above 38 degrees"},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny base with a short context: fine-tuning steps take milliseconds."""
    return tiny_base(tmp_path_factory.mktemp("lora-jobs") / "base", block_size=64)


def serve(base: Path, tmp: Path, **settings):
    settings = make_settings(tmp, lora_job_iters=6, **settings)
    return running_server(create_app(settings, load_models([("tiny", str(base))])))


def people(client: httpx.Client) -> tuple[dict, dict, dict]:
    """Headers of an admin (the first account) and two users."""
    for name in ("ana", "beto", "carla"):
        register(client, name)
    return login(client, "ana"), login(client, "beto"), login(client, "carla")


def finished(client: httpx.Client, job_id: str, headers: dict, timeout: float = 240) -> dict:
    done = wait_until(
        lambda: (
            client.get(f"/v1/lora/jobs/{job_id}", headers=headers).json()["status"]
            not in ("queued", "running")
        ),
        timeout=timeout,
        interval=0.5,
    )
    job = client.get(f"/v1/lora/jobs/{job_id}", headers=headers).json()
    assert done, job
    return job


def test_a_conversation_becomes_a_served_downloadable_adapter(base, tmp_path):
    with serve(base, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as client:
        admin, beto, carla = people(client)
        r = client.post("/v1/lora/generate", headers=beto, json={"messages": CHAT, "domain": "Medicina"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["domain"] == "medicina"
        assert job["adapter"] == "tiny-medicina" and job["base"] == "tiny"

        # one job at a time per user: the second is told to wait
        again = client.post("/v1/lora/generate", headers=beto, json={"messages": CHAT, "domain": "medicina"})
        assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_jobs"
        assert "retry-after" in again.headers
        # owner-only: another user cannot see it (as if it did not exist); an admin can
        assert client.get(f"/v1/lora/jobs/{job['id']}", headers=carla).status_code == 404
        assert client.get("/v1/lora/jobs", headers=carla).json()["data"] == []
        assert client.get(f"/v1/lora/jobs/{job['id']}", headers=admin).status_code == 200

        job = finished(client, job["id"], beto)
        assert job["status"] == "succeeded", job
        assert job["step"] == job["max_iters"] == 6 and job["metrics"]["val_loss"] > 0

        models = {m["id"]: m for m in client.get("/v1/models", headers=beto).json()["data"]}
        assert models["tiny-medicina"]["parent"] == "tiny"
        r = client.post("/v1/chat/completions", headers=beto,
                        json={"model": "tiny-medicina", "messages": CHAT[:1], "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "tiny-medicina"

        weights = client.get(job["files"]["safetensors"], headers=beto)
        assert weights.status_code == 200
        tensors = load_safetensors(weights.content)
        assert tensors and all(k.startswith("base_model.model.") and ".lora_" in k for k in tensors)
        assert client.get(job["files"]["safetensors"], headers=carla).status_code == 404
        archive = zipfile.ZipFile(io.BytesIO(client.get(job["files"]["zip"], headers=beto).content))
        archive.extractall(tmp_path / "unzipped")
        # the download is a PEFT directory the server loads as it loads any adapter
        body = {"lora_name": "from-zip", "lora_path": str(tmp_path / "unzipped" / "tiny-medicina")}
        assert client.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200

        stats = client.get("/v1/lora/stats", headers=carla).json()
        assert stats["lora_files_generated"] == 1 and stats["domains"] == ["medicina"]
        assert stats["max_domains"] == 32 and set(stats["adapters"]) == {"tiny-medicina", "from-zip"}
        assert stats["jobs"] == {} and client.get("/v1/lora/stats", headers=beto).json()["jobs"] == {
            "succeeded": 1
        }
        metrics = client.get("/metrics", headers=admin).text
        assert "semilla_lora_files_generated_total" in metrics

    # a restart finds the job where it ended and serves its adapter again
    with serve(base, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as client:
        beto = login(client, "beto")
        assert client.get(f"/v1/lora/jobs/{job['id']}", headers=beto).json()["status"] == "succeeded"
        assert client.get("/v1/lora/stats", headers=beto).json()["lora_files_generated"] == 1
        r = client.post("/v1/chat/completions", headers=beto,
                        json={"model": "tiny-medicina", "messages": CHAT[:1], "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200, r.text


def test_jobs_from_stored_conversations_the_seed_alias_and_cancelling(base, tmp_path):
    with serve(base, tmp_path, lora_jobs_per_user=2) as url, httpx.Client(base_url=url, timeout=60) as client:
        admin, beto, carla = people(client)
        conv = client.post("/v1/conversations", headers=beto, json={"title": "t", "messages": CHAT}).json()
        empty = client.post("/v1/conversations", headers=beto, json={"messages": CHAT[:1]}).json()

        r = client.post(
            "/v1/lora/generate", headers=carla, json={"conversation_id": conv["id"], "domain": "x"}
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "conversation_id"  # not hers
        r = client.post(
            "/v1/lora/generate", headers=beto, json={"conversation_id": empty["id"], "domain": "x"}
        )
        assert r.status_code == 400 and "no assistant answer" in r.json()["error"]["message"]

        long = {"conversation_id": conv["id"], "domain": "legal", "max_iters": 5000}
        slow = client.post("/v1/lora/generate", headers=beto, json=long).json()
        assert wait_until(lambda: client.get(f"/v1/lora/jobs/{slow['id']}", headers=beto).json()["step"] > 0,
                          timeout=120, interval=0.5)  # fmt: skip
        assert client.post(f"/v1/lora/jobs/{slow['id']}/cancel", headers=carla).status_code == 404
        cancelled = client.post(f"/v1/lora/jobs/{slow['id']}/cancel", headers=beto).json()
        assert cancelled["status"] == "cancelled"
        r = client.post(f"/v1/lora/jobs/{slow['id']}/cancel", headers=beto)
        assert r.status_code == 409
        r = client.get(f"/v1/lora/jobs/{slow['id']}/adapter.safetensors", headers=beto)
        assert r.status_code == 409 and "cancelled" in r.json()["error"]["message"]

        # the seed's own body: conversation, domain, model, target_model
        seed = {"conversation": CHAT, "domain": "medicina", "model": "tiny", "target_model": "phi3-personal"}
        r = client.post("/api/lora/generate", headers=beto, json=seed)
        assert r.status_code == 202, r.text
        job = finished(client, r.json()["id"], beto)
        assert job["status"] == "succeeded" and job["adapter"] == "phi3-personal"
        names = {m["id"] for m in client.get("/v1/models", headers=beto).json()["data"]}
        assert "phi3-personal" in names and "tiny-legal" not in names
        assert client.get("/v1/lora/stats", headers=beto).json()["lora_files_generated"] == 1


def test_bad_job_requests_are_one_line_4xx(base, tmp_path):
    with serve(base, tmp_path, lora_max_domains=2) as url, httpx.Client(base_url=url, timeout=60) as client:
        _, beto, carla = people(client)

        def start(headers=beto, **body) -> httpx.Response:
            return client.post("/v1/lora/generate", headers=headers, json={"messages": CHAT, **body})

        cases = {
            "lora_r": start(domain="a", lora_r=0),
            "lora_r ": start(domain="a", lora_r=-4),
            "domain": start(domain="../etc"),
            "target_model": start(domain="a", adapter="../x"),
            "conversation_id": client.post("/v1/lora/generate", headers=beto, json={"domain": "a"}),
            "model": start(domain="a", model="nope"),
            "messages": start(domain="a", messages=[]),
            "max_iters": start(domain="a", max_iters=0),
        }
        for param, r in cases.items():
            assert 400 <= r.status_code < 500, (param, r.text)
            assert r.json()["error"]["param"] in (param.strip(), "base_model_name", "model"), (param, r.text)
        assert start(domain="a", adapter="tiny").status_code == 409  # the base model's own name
        assert client.post("/api/lora/generate", headers=beto, json={"domain": "a"}).json()["error"]

        assert start(domain="uno").status_code == 202
        assert start(headers=carla, domain="dos").status_code == 202
        third = client.post(
            "/v1/lora/generate", json={"messages": CHAT, "domain": "tres"}, headers=login(client, "ana")
        )
        assert third.status_code == 400, third.text
        error = third.json()["error"]
        assert error["code"] == "too_many_domains" and "at most 2 domains" in error["message"]
