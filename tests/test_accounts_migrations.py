"""Schema migrations upgrade an existing database in place, keeping every row."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect, text

from semilla.serve.accounts.migrate import alembic_config, migrate


def test_an_0001_database_upgrades_to_head_without_losing_rows(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config(engine)
    with engine.begin() as connection:  # a database written by the first release
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0001")
    assert "scale" not in {c["name"] for c in inspect(engine).get_columns("feedback")}
    with engine.begin() as c:
        c.execute(text("INSERT INTO users (id, username, password_hash, role, disabled, created_at) "
                       "VALUES (1, 'ana', 'x', 'admin', 0, '2026-01-01')"))  # fmt: skip
        c.execute(text("INSERT INTO api_keys (id, user_id, name, key_hash, prefix, scopes, created_at) "
                       "VALUES (1, 1, 'app', 'h', 'sk-abc', 'models', '2026-01-01')"))  # fmt: skip
        for i, rating in enumerate((1, -1, 3, 5)):
            c.execute(text("INSERT INTO feedback (id, created_at, user_id, rating, text) "
                           "VALUES (:i, '2026-01-01', 1, :r, 'kept')"), {"i": i + 1, "r": rating})  # fmt: skip
    migrate(engine)
    with engine.connect() as c:
        rows = c.execute(text("SELECT rating, scale, text FROM feedback ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, "thumbs", "kept"), (-1, "thumbs", "kept"), (3, "stars", "kept"), (5, "stars", "kept")]  # fmt: skip
        # the batch copy of `feedback` fired no cascade: the account and its key are still there
        assert c.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        assert c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    migrate(engine)  # idempotent at head
