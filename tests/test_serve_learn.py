"""The self-learning loop as a server job: an admin starts, watches and stops it over
/admin/learn, a real teacher of the tests' own answers on loopback, and /metrics counts it."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from accounts_helpers import build_app, login, make_settings, register, serve
from helpers import DEMO_TEXT, tiny_configs
from learn_helpers import Teacher, teacher_server
from server_helpers import wait_until

from semilla.data import prepare

FAST = dict(teacher_model="t", questions_per_hour=100, questions_per_day=100, min_question_spacing_s=0,
            num_samples=1, train_steps=10, questions_per_round=2, val_tokens=2000)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/tiny: a tiny char-level model trained briefly on the bundled Quijote."""
    from semilla.train import train

    root = tmp_path_factory.mktemp("learn-job")
    (root / "quijote.txt").write_text(DEMO_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    prepare([str(root / "quijote.txt")], str(root / "data"))
    train(*tiny_configs(root / "data", root / "runs" / "tiny", n_embd=32, block_size=64, batch_size=8,
                        max_iters=40, eval_interval=40, save_interval=40, sample_interval=400))  # fmt: skip
    return root / "runs"


def counters(client: httpx.Client) -> dict[str, float]:
    """The semilla_learn_* samples of /metrics, by name and labels."""
    text = client.get("/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(semilla_learn_\S+) (\S+)$", text, re.M)}


def test_an_admin_starts_watches_and_stops_the_learning_loop(runs: Path, tmp_path: Path):
    settings = make_settings(tmp_path, runs_dir=str(runs), metrics_public=True)
    app = build_app(settings, runs / "tiny")
    teacher = Teacher("facts")
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=30) as client,
        teacher_server(teacher) as teacher_url,
    ):
        register(client, "ana")  # the first account is an admin
        register(client, "beto")
        admin, user = login(client, "ana"), login(client, "beto")
        body = {"run": "tiny", "settings": {**FAST, "teacher_url": teacher_url}}
        assert client.post("/admin/learn/start", json=body, headers=user).status_code == 403
        assert client.get("/admin/learn", headers=user).status_code == 403
        assert client.get("/admin/learn", headers=admin).json() == {"job": None, "stats": None}
        for bad, status, words in [
            ({**body, "run": "../tiny"}, 400, "run directory's name"),
            ({**body, "run": "nope"}, 404, "no trained run 'nope'"),
            (
                {**body, "settings": {**body["settings"], "topics": "/etc/passwd"}},
                400,
                "not by a request: topics",
            ),
            ({**body, "settings": {**body["settings"], "questions_per_hour": 0}}, 400, "questions_per_hour"),
            ({**body, "settings": {**body["settings"], "colour": 1}}, 400, "unknown learn settings: colour"),
            ({**body, "teacher": "llama3"}, 400, "PROVIDER/MODEL"),
        ]:
            r = client.post("/admin/learn/start", json=bad, headers=admin)
            assert r.status_code == status and words in r.json()["error"]["message"], (bad, r.text)
        assert client.post("/admin/learn/stop", headers=admin).status_code == 409  # nothing runs
        before = counters(client)
        started = client.post("/admin/learn/start", json=body, headers=admin)
        assert started.status_code == 200, started.text
        assert started.json()["job"]["state"] in ("running", "finished")
        again = client.post("/admin/learn/start", json=body, headers=admin)
        assert (
            again.status_code == 409
            or client.get("/admin/learn", headers=admin).json()["job"]["state"] != "running"
        )

        def state() -> str:
            return client.get("/admin/learn", headers=admin).json()["job"]["state"]

        assert wait_until(lambda: state() != "running", timeout=600, interval=0.5)
        status = client.get("/admin/learn", headers=admin).json()
        assert status["job"]["state"] == "finished", status
        stats, [done] = status["stats"], status["job"]["rounds_done"]
        assert stats["rounds"] == 1 and stats["questions_asked"] == 2 and done["questions"] == 2
        after = counters(client)
        grew = {k: after[k] - before.get(k, 0.0) for k in after}
        assert grew["semilla_learn_questions_total"] == 2
        assert grew["semilla_learn_gaps_total"] == stats["gaps_detected"]
        assert grew["semilla_learn_examples_total"] == stats["examples_generated"]
        assert grew["semilla_learn_datasets_total"] == stats["datasets_generated"]
        outcome = {"promoted": 'semilla_learn_rounds_total{outcome="promoted"}',
                   "rolled_back": 'semilla_learn_rounds_total{outcome="rolled_back"}'}  # fmt: skip
        assert sum(grew.get(v, 0) for v in outcome.values()) == stats["promotions"] + stats["rollbacks"]
        assert after["semilla_learn_running"] == 0

        # forever, with one question an hour left: the loop asks it, then waits for the limit; stop
        # ends the wait, and what it asked is counted
        forever = {**body, "forever": True, "settings": {**body["settings"], "questions_per_hour": 3}}
        assert client.post("/admin/learn/start", json=forever, headers=admin).status_code == 200
        assert wait_until(lambda: (client.get("/admin/learn", headers=admin).json()["stats"] or {}).get(
            "questions_asked") == 3, timeout=120, interval=0.2)  # fmt: skip
        assert state() == "running"
        stopping = client.post("/admin/learn/stop", headers=admin)
        # the loop may already have ended the wait and stopped by the time the answer is written
        assert stopping.status_code == 200 and stopping.json()["job"]["state"] in ("stopping", "stopped")
        assert wait_until(lambda: state() == "stopped", timeout=30, interval=0.2)
        assert counters(client)["semilla_learn_questions_total"] == after["semilla_learn_questions_total"] + 1
        audit = client.get("/admin/audit", headers=admin).json()["data"]
        assert {"learn.start", "learn.stop"} <= {row["action"] for row in audit}
