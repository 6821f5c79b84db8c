"""Schema migrations with Alembic, run programmatically at start-up (no alembic.ini needed)."""

from __future__ import annotations

import logging
from pathlib import Path

logging.getLogger("alembic").setLevel(logging.WARNING)  # before importing it: its INFO lines are noise

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from semilla.errors import SemillaError  # noqa: E402
from semilla.serve.accounts.generation import install_triggers  # noqa: E402

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x73656D696C6C61  # PostgreSQL advisory lock id ("semilla"): one migrating replica at a time


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


class DanglingReferencesError(SemillaError):
    """Rows point at rows that do not exist (written with foreign keys off, e.g. by hand)."""

    def __init__(self, database: str, broken: list):
        # PRAGMA foreign_key_check rows: (table, rowid, referred table, constraint index)
        first = broken[0]
        super().__init__(
            f"the database {database} has {len(broken)} row(s) pointing at rows that do not exist, "
            f"e.g. {first[0]} row {first[1]} -> {first[2]}; delete or repair them "
            f"(sqlite3 {database} 'DELETE FROM {first[0]} WHERE rowid = {first[1]}')"
        )


def migrate(engine: Engine) -> None:
    """Upgrade the database to the newest schema; an existing database keeps its rows.

    Replicas starting together on PostgreSQL migrate one at a time: the upgrade holds an
    advisory lock, so the others wait and then find the schema already at the newest version."""
    cfg = alembic_config(engine)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # a batch migration copies and drops tables: cascades must not fire
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # the pragma only works outside a transaction
        with connection.begin():
            if connection.dialect.name == "postgresql":  # released when the transaction ends
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
            install_triggers(connection)
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
            if broken:
                raise DanglingReferencesError(engine.url.database or "", broken)


def new_revision(engine: Engine, message: str) -> None:
    """Write a new migration from the difference between the models and `engine`'s database."""
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.revision(cfg, message=message, autogenerate=True)
