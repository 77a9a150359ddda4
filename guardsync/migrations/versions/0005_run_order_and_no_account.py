"""Runs ordered by the database (a sequence, not a worker's clock); disabled users seen without an account.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("seq", sa.Integer))
    # The runs kept so far, numbered in the order they started (their clocks are all there is to go by).
    op.execute("UPDATE runs SET seq = (SELECT COUNT(*) FROM runs AS earlier WHERE earlier.started_at < runs.started_at"
               " OR (earlier.started_at = runs.started_at AND earlier.run_id <= runs.run_id))")
    op.create_table(
        "no_account",
        sa.Column("external_id", sa.String(64), primary_key=True),  # Entra user id
        sa.Column("user_name", sa.Text, nullable=False),
    )
