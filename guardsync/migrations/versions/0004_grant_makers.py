"""The grant ledger: each grant's maker ("guardsync" or "hand") and the run that confirmed it.

Rows of revision 0003 recorded only guardsync's grants: they keep that maker.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_grants") as table:
        table.add_column(sa.Column("maker", sa.String(16), nullable=False, server_default="guardsync"))
        table.add_column(sa.Column("run_id", sa.String(64)))
