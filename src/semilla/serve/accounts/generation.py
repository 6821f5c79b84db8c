"""The auth generation: a counter in the database that moves whenever an identity may have
changed, so every server drops its cached identities on the next request.

Triggers bump it on any insert or delete of a user, API key or revoked token, and on updates
of the columns that decide who a caller is and what they may do; so a change counts however it
is made (the HTTP API, `semilla admin`, another replica on the same database, plain SQL). A
server reads it once per request (`current()`, one indexed row) and compares. Replicas that
share a Redis could publish the same counter there instead; `current()` is the seam.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from semilla.serve.accounts.db import Store

# table -> columns whose update changes an identity (inserts and deletes always count)
WATCHED = {
    "users": ("username", "password_hash", "role", "disabled"),
    "api_keys": ("user_id", "key_hash", "scopes", "expires_at", "revoked_at"),
    "revoked_tokens": ("jti", "expires_at"),
}
BUMP = "UPDATE auth_generation SET value = value + 1 WHERE id = 1"


def install_triggers(connection: Connection) -> None:
    """Create the triggers if missing (idempotent). Run after every migration: SQLite drops a
    table's triggers when a batch migration rebuilds that table."""
    if connection.dialect.name == "sqlite":
        for table, columns in WATCHED.items():
            for event in ("INSERT", "DELETE", f"UPDATE OF {', '.join(columns)}"):
                name = f"semilla_auth_{table}_{event.split()[0].lower()}"
                connection.exec_driver_sql(
                    f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON {table} BEGIN {BUMP}; END"
                )
        return
    connection.exec_driver_sql(
        "CREATE OR REPLACE FUNCTION semilla_bump_auth_generation() RETURNS trigger LANGUAGE plpgsql "
        f"AS $$ BEGIN {BUMP}; RETURN NULL; END $$"
    )
    for table, columns in WATCHED.items():
        name = f"semilla_auth_{table}"
        connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        connection.exec_driver_sql(
            f"CREATE TRIGGER {name} AFTER INSERT OR DELETE OR UPDATE OF {', '.join(columns)} ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION semilla_bump_auth_generation()"
        )


def drop_triggers(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        for table in WATCHED:
            for event in ("insert", "delete", "update"):
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS semilla_auth_{table}_{event}")
        return
    for table in WATCHED:
        connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS semilla_auth_{table} ON {table}")
    connection.exec_driver_sql("DROP FUNCTION IF EXISTS semilla_bump_auth_generation()")


class AuthGeneration:
    """The counter of one store."""

    def __init__(self, store: Store):
        self.store = store

    def current(self) -> int:
        with self.store.read() as s:
            return int(s.execute(text("SELECT value FROM auth_generation WHERE id = 1")).scalar_one())
