"""Alembic migrations of the state store (guardsync.state upgrades a store to the head on open).

A new revision: `alembic -c guardsync/migrations/alembic.ini revision -m "what changes"` from the
repository root, then write its upgrade() by hand (keep the chain linear, one revision a change).
"""
