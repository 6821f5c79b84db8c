"""conversations.domain: the tag that says which LoRA domain a conversation teaches ('medicina')

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN on SQLite too: no table copy, so no cascade can touch the messages
    op.add_column("conversations", sa.Column("domain", sa.String(length=64), nullable=True))
    op.create_index("ix_conversations_domain", "conversations", ["domain"])


def downgrade() -> None:
    op.drop_index("ix_conversations_domain", table_name="conversations")
    op.drop_column("conversations", "domain")  # SQLite >= 3.35 drops a column in place
