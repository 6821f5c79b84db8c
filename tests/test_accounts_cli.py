"""`semilla admin ...` on a real store, and `semilla prepare --scrub-pii`."""

from __future__ import annotations

import json

import httpx
from accounts_helpers import build_app, chat, make_settings, serve

from semilla.cli import main


def admin(tmp_path, *args: str) -> int:
    return main(["admin", "--data-dir", str(tmp_path / "data"), *args])


def test_admin_cli_manages_users_keys_and_feedback(tmp_path, tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("SEMILLA_ADMIN_PASSWORD", "correct horse battery")
    assert admin(tmp_path, "create-user", "root", "--admin") == 0
    assert admin(tmp_path, "create-user", "ana") == 0
    assert admin(tmp_path, "create-user", "ana") == 2  # taken: one line, exit 2
    assert "taken" in capsys.readouterr().err
    assert admin(tmp_path, "create-key", "ana", "--name", "ci") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        done = chat(c, {"X-API-Key": key}, prompt="hola").json()  # a real completion from the tiny model
        answer = done["choices"][0]["message"]["content"]
        assert (
            c.post(
                "/feedback", headers={"X-API-Key": key}, json={"completion_id": done["id"], "rating": 5}
            ).status_code
            == 201
        )
        assert admin(tmp_path, "revoke-key", "1") == 0
    assert admin(tmp_path, "set-role", "ana", "admin") == 0
    assert admin(tmp_path, "set-role", "ghost", "user") == 2
    capsys.readouterr()
    assert admin(tmp_path, "feedback", "export", str(tmp_path / "fb.jsonl")) == 0
    rows = [json.loads(line) for line in (tmp_path / "fb.jsonl").read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": "hola"}, {"role": "assistant", "content": answer}],
                     "rating": 5, "scale": "stars", "positive": True, "feedback": "", "model": "tiny", "completion_id": done["id"]}]  # fmt: skip
    assert admin(tmp_path, "feedback", "list") == 0
    assert admin(tmp_path, "audit", "--action", "key.revoke") == 0
    out = capsys.readouterr().out
    assert '"rating": 5' in out and '"action": "key.revoke"' in out
    assert admin(tmp_path, "retention", "--days", "30") == 0


def test_prepare_scrubs_pii(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Escribe a ana@example.com o llama al +34 612 345 678.\n" * 20, encoding="utf-8")
    assert (
        main(["prepare", str(corpus), "-o", str(tmp_path / "data"), "--scrub-pii", "-q", "--split", "1,0,0"])
        == 0
    )
    tok = json.loads((tmp_path / "data" / "tokenizer.json").read_text())
    assert "@" not in json.dumps(tok["model"]["vocab"]), "the email's characters never reached the tokenizer"
