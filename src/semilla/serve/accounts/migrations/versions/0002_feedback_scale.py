"""feedback.scale: say whether a rating is a thumb (-1/+1) or stars (1-5), so 1 is never ambiguous

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scale", sa.String(length=8), server_default="thumbs", nullable=False))
    # rows written before: 2-5 can only have been stars; -1/+1 were thumbs (the UI's buttons)
    op.execute("UPDATE feedback SET scale = 'stars' WHERE rating > 1")


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_column("scale")
