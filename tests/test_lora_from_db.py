"""Conversations as fine-tuning data: the 0007 migration's domain tag (SQLite and a real
PostgreSQL), tagging over HTTP with at most 32 domains, `semilla finetune --from-db` and its
filters (domain, user, positive feedback only, date range) on both databases."""

from __future__ import annotations

import json
import re
from datetime import datetime

import httpx
import pytest
from accounts_helpers import login, make_settings, register
from alembic import command
from helpers import assert_one_line_error, run_cli
from lora_helpers import tiny_base
from replica_helpers import running_postgres
from server_helpers import running_server
from sqlalchemy import create_engine, inspect, text

from semilla.errors import SemillaError
from semilla.serve.accounts.db import Conversation, Feedback, Message, Store, User
from semilla.serve.accounts.domains import ConversationFilter, export_conversations
from semilla.serve.accounts.migrate import alembic_config, migrate
from semilla.serve.app import create_app
from semilla.serve.registry import load_models


@pytest.fixture(scope="module")
def postgres():
    with running_postgres() as pg:
        yield pg


def test_0007_adds_the_domain_tag_keeping_every_conversation(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0006")
    with engine.begin() as c:
        c.execute(text("INSERT INTO conversations (id, user_id, title, created_at, updated_at) "
                       "VALUES ('conv-1', NULL, 't', '2026-01-01', '2026-01-01')"))  # fmt: skip
        c.execute(text("INSERT INTO messages (conversation_id, role, content, created_at) "
                       "VALUES ('conv-1', 'user', 'kept', '2026-01-01')"))  # fmt: skip
    migrate(engine)
    assert "domain" in {c["name"] for c in inspect(engine).get_columns("conversations")}
    with engine.connect() as c:
        assert c.execute(text("SELECT domain FROM conversations")).scalar() is None
        assert c.execute(text("SELECT content FROM messages")).scalar() == "kept"
    with engine.begin() as connection:  # and back
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0006")
    assert "domain" not in {c["name"] for c in inspect(engine).get_columns("conversations")}
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM messages")).scalar() == 1


def fill(store: Store) -> None:
    """Two accounts' conversations over two domains, days and ratings."""
    with store.write() as s:
        s.add_all(
            [User(id=1, username="ana", password_hash="x"), User(id=2, username="beto", password_hash="x")]
        )
        s.flush()
        rows = [  # id, owner, domain, day, rating of its answer (None: unrated)
            ("c1", 1, "medicina", 1, 1), ("c2", 1, "medicina", 5, None), ("c3", 2, "medicina", 3, 1),
            ("c4", 1, "legal", 2, 1), ("c5", 1, None, 4, 1), ("c6", 1, "medicina", 6, -1),
        ]  # fmt: skip
        for cid, owner, domain, day, rating in rows:
            at = datetime(2026, 3, day, 12)
            s.add(Conversation(id=cid, user_id=owner, domain=domain, created_at=at, updated_at=at))
            s.flush()
            s.add(Message(conversation_id=cid, role="user", content=f"question {cid}"))
            s.add(
                Message(
                    conversation_id=cid,
                    role="assistant",
                    content=f"answer {cid}",
                    completion_id=f"cmpl-{cid}",
                )
            )
            if rating is not None:
                s.add(Feedback(completion_id=f"cmpl-{cid}", rating=rating, user_id=owner))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_filters_pick_conversations_on_sqlite_and_postgresql(database, postgres, tmp_path):
    url = (
        postgres.new_database("fromdb") if database == "postgresql" else f"sqlite:///{tmp_path / 'db.sqlite'}"
    )
    store = Store(url)
    migrate(store.engine)
    fill(store)
    store.dispose()

    def chosen(**where) -> list[str]:
        path = tmp_path / "out.jsonl"
        export_conversations(url, ConversationFilter(**where), path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["messages"][0]["content"].removeprefix("question ") for r in rows]

    assert chosen() == ["c1", "c4", "c3", "c5", "c2", "c6"]  # oldest first
    assert chosen(domain="medicina") == ["c1", "c3", "c2", "c6"]
    assert chosen(domain="medicina", username="ana") == ["c1", "c2", "c6"]
    assert chosen(domain="medicina", positive_only=True) == ["c1", "c3"]
    assert chosen(since=datetime(2026, 3, 3), until=datetime(2026, 3, 5)) == ["c3", "c5"]
    with pytest.raises(SemillaError, match="no account named 'nadie'"):
        chosen(username="nadie")


def test_finetune_from_db_trains_on_the_chosen_conversations(tmp_path, cli_in_process):
    base = tiny_base(tmp_path / "base", block_size=16)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    migrate(store.engine)
    fill(store)
    with store.write() as s:  # enough text for a held-out split of 16-token windows
        for m in s.query(Message).filter(Message.role == "assistant"):
            m.content = "the answer is the quick brown fox " * 8
    store.dispose()
    out = tmp_path / "adapter"
    common = ("--max-iters", "2", "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1",
              "--warmup-iters", "1", "--device", "cpu", "--json")  # fmt: skip
    r = run_cli("finetune", base, "--from-db", url, "--domain", "Medicina", "--positive-only", "--since",
                "2026-03-01", "--until", "2026-03-03", "-o", out, *common, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "data").is_dir()  # the chosen conversations were prepared into the run

    r = cli_in_process(
        "finetune", base, "--from-db", url, "--domain", "cocina", "-o", tmp_path / "x", *common
    )
    assert_one_line_error(r, "--from-db", "no conversation", "--domain cocina")
    r = cli_in_process(
        "finetune", base, "--from-db", f"sqlite:///{tmp_path / 'none.db'}", "-o", tmp_path / "x", *common
    )
    assert_one_line_error(r, "--from-db: no database at")
    assert not (tmp_path / "none.db").exists()  # reading never creates one
    r = cli_in_process("finetune", base, "--from-db", "not a url", "-o", tmp_path / "x", *common)
    assert_one_line_error(r, "'not a url' is not a database URL")
    r = cli_in_process("finetune", base, "--data", "x.jsonl", "--user", "ana", "-o", tmp_path / "x", *common)
    assert_one_line_error(r, "--user", "--from-db")
    r = cli_in_process("finetune", base, "--from-db", url, "--since", "March", "-o", tmp_path / "x", *common)
    assert r.returncode == 2 and "YYYY-MM-DD" in r.stderr


def test_conversations_are_tagged_with_at_most_32_domains(tmp_path):
    base = tiny_base(tmp_path / "base", block_size=64)
    app = create_app(make_settings(tmp_path), load_models([("tiny", str(base))]))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        register(client, "ana")
        ana = login(client, "ana")
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
        ids = [
            client.post("/v1/conversations", headers=ana, json={"messages": chat}).json()["id"]
            for _ in range(34)
        ]
        for i, cid in enumerate(ids[:32]):
            r = client.patch(f"/v1/conversations/{cid}", headers=ana, json={"domain": f"Dominio-{i}"})
            assert r.status_code == 200 and r.json()["domain"] == f"dominio-{i}", r.text
        r = client.patch(f"/v1/conversations/{ids[32]}", headers=ana, json={"domain": "el-33"})
        assert r.status_code == 400, r.text
        assert (
            r.json()["error"]["code"] == "too_many_domains"
            and "at most 32 domains" in r.json()["error"]["message"]
        )
        r = client.patch(
            f"/v1/conversations/{ids[32]}", headers=ana, json={"title": "renamed", "domain": "el-33"}
        )
        assert r.status_code == 400  # and nothing of the request was applied:
        assert client.get(f"/v1/conversations/{ids[32]}", headers=ana).json()["title"] != "renamed"
        assert (
            client.patch(f"/v1/conversations/{ids[32]}", headers=ana, json={"domain": ""}).status_code == 400
        )
        r = client.post("/v1/lora/generate", headers=ana, json={"messages": chat, "domain": "el-33"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_domains"
        # an existing domain is always fine; clearing a tag frees its domain for another
        assert (
            client.patch(
                f"/v1/conversations/{ids[32]}", headers=ana, json={"domain": "dominio-0"}
            ).status_code
            == 200
        )
        assert (
            client.patch(f"/v1/conversations/{ids[31]}", headers=ana, json={"domain": None}).json()["domain"]
            is None
        )
        assert (
            client.patch(f"/v1/conversations/{ids[33]}", headers=ana, json={"domain": "el-33"}).status_code
            == 200
        )
        assert client.patch(f"/v1/conversations/{ids[0]}", headers=ana, json={}).status_code == 400

        tagged = client.get("/v1/conversations", headers=ana, params={"domain": "dominio-0"}).json()["data"]
        assert sorted(c["id"] for c in tagged) == sorted([ids[0], ids[32]])
        # a job with no conversation named learns from every conversation the caller tagged with it
        r = client.post("/v1/lora/generate", headers=ana, json={"domain": "dominio-0", "max_iters": 2})
        assert r.status_code == 202 and r.json()["conversations"] == 2, r.text
        client.post(f"/v1/lora/jobs/{r.json()['id']}/cancel", headers=ana)


def test_finetune_domain_picks_the_tagged_rows_of_a_jsonl(tmp_path, cli_in_process):
    base = tiny_base(tmp_path / "base", block_size=16)
    rows = [{"domain": "Legal", "messages": [{"role": "user", "content": "contract?"},
                                             {"role": "assistant", "content": "a signed agreement " * 6}]},
            {"domain": "medicina", "messages": [{"role": "user", "content": "fever?"},
                                                {"role": "assistant", "content": "a high temperature " * 6}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 6}]}]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 30))
    common = ("--max-iters", "2", "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1",
              "--warmup-iters", "1", "--device", "cpu", "--json")  # fmt: skip

    def train_tokens(*flags) -> int:
        r = run_cli("finetune", base, "--data", data, *flags, *common, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(re.search(r"data: ([\d,]+) train tokens", r.stderr).group(1).replace(",", ""))

    legal = train_tokens("--domain", "legal", "-o", tmp_path / "legal")
    assert (tmp_path / "legal" / "adapter_model.safetensors").is_file()
    everything = train_tokens("-o", tmp_path / "all")
    assert 0.2 < legal / everything < 0.5  # one row in three is tagged legal
    r = cli_in_process("finetune", base, "--data", data, "--domain", "cocina", "-o", tmp_path / "x", *common)
    assert_one_line_error(r, "--domain cocina", "no row of", "tagged")
    r = cli_in_process(
        "finetune", base, "--data", tmp_path / "base", "--domain", "legal", "-o", tmp_path / "x", *common
    )
    assert_one_line_error(r, "is not a .jsonl file")
