"""Alembic environment: run by `semilla.serve.accounts.migrate.migrate` on a given connection."""

from alembic import context

from semilla.retrieval.tables import RetrievalBase
from semilla.serve.accounts.db import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=[Base.metadata, RetrievalBase.metadata],
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
