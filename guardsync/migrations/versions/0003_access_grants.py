"""Product access ([access]): the grants guardsync made, the only ones it may revoke.

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
    op.create_table(
        "access_grants",
        sa.Column("group_id", sa.String(64), primary_key=True),  # Entra group id
        sa.Column("workspace_id", sa.String(255), primary_key=True),
        sa.Column("product", sa.Text, nullable=False),  # key@site-host, for people
    )
