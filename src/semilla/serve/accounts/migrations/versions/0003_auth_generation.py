"""auth_generation: one counter that triggers bump when a user, key or revoked token changes

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "auth_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "value": 0}])
    # the triggers themselves: semilla.serve.accounts.generation.install_triggers, after every upgrade


def downgrade() -> None:
    from semilla.serve.accounts.generation import drop_triggers

    drop_triggers(op.get_bind())
    op.drop_table("auth_generation")
