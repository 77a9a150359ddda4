"""An index for the audit lookups a resumed load makes: the writes of one run, by operation and outcome.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("audit_by_run", "audit", ["run_id", "operation", "outcome"])
