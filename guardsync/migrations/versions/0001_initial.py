"""The state store as it was before migrations: binding, users, groups, members, runs, audit, locks, mirror.

A store made before guardsync had migrations already holds these tables (its schema was made
with create_all): this revision creates only the tables that are missing, so such a store is
adopted as it is, and an empty database gets the whole schema.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)

TABLES = {
    "binding": lambda: [sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False)],
    "users": lambda: [
        sa.Column("external_id", sa.String(64), primary_key=True),
        sa.Column("scim_id", sa.String(255), nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
    ],
    "groups": lambda: [
        sa.Column("external_id", sa.String(64), primary_key=True),
        sa.Column("scim_id", sa.String(255), nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
    ],
    "members": lambda: [
        sa.Column("group_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(64), primary_key=True),
    ],
    "runs": lambda: [
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("counts", sa.Text),
        sa.Column("message", sa.Text),
    ],
    "audit": lambda: [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("object_id", sa.Text, nullable=False),
        sa.Column("object_name", sa.Text),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
    ],
    "locks": lambda: [
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("acquired_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    ],
    "mirror": lambda: [
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    ],
}


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    for name, columns in TABLES.items():
        if name not in present:
            op.create_table(name, *columns())
