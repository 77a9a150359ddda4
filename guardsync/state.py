"""The state store: what guardsync applied to Atlassian, and the audit of every write.

SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (shared deployments).
Every successful write is recorded in its own transaction, together with its
audit row, the moment it succeeds: a run killed at any point resumes from here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from guardsync.errors import ConfigError, GuardsyncBlocked
from guardsync.models import DesiredUser
from guardsync.plan import AppliedGroup, AppliedState, AppliedUser

metadata = MetaData()

binding = Table(
    "binding", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
users = Table(
    "users", metadata,
    Column("external_id", String(64), primary_key=True),
    Column("scim_id", String(255), nullable=False),
    Column("record", Text, nullable=False),  # JSON of the DesiredUser last written
    Column("active", Boolean, nullable=False),
)
groups = Table(
    "groups", metadata,
    Column("external_id", String(64), primary_key=True),
    Column("scim_id", String(255), nullable=False),
    Column("display_name", Text, nullable=False),
)
members = Table(
    "members", metadata,
    Column("group_id", String(64), primary_key=True),
    Column("user_id", String(64), primary_key=True),
)
runs = Table(
    "runs", metadata,
    Column("run_id", String(64), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("mode", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("counts", Text),
    Column("message", Text),
)
audit = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("object_type", String(16), nullable=False),
    Column("object_id", String(64), nullable=False),
    Column("object_name", Text),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text),
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(connection, _record):  # WAL: readers never block the writer; one fsync per checkpoint
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


class StateStore:
    """Applied state, bindings, runs and audit, behind one small API."""

    def __init__(self, url: str):
        try:
            self.engine = create_engine(url, future=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"[sync] state: cannot use {_safe_url(url)} ({type(exc).__name__}); give a SQLAlchemy URL such as sqlite:///guardsync-state.db") from None
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        self._lock = threading.Lock()  # loader threads share one store; writes are serialised
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise ConfigError(f"[sync] state: cannot open {_safe_url(url)} ({type(exc).__name__}); check the database is reachable and the URL") from None

    # -- binding: one store, one (tenant, directory) pair ---------------------------
    def binding(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {row.key: row.value for row in conn.execute(select(binding))}

    def check_binding(self, tenant_id: str, scim_url: str) -> None:
        """Refuse a store that belongs to another tenant or SCIM directory (guard, exit 3)."""
        bound = self.binding()
        for key, value in (("tenant_id", tenant_id), ("scim_url", scim_url)):
            if key in bound and bound[key] != value:
                raise GuardsyncBlocked(
                    "state_binding",
                    f"the state store belongs to {key} {bound[key]}, not {value}",
                    "Point [sync] state at this directory's own store; one store serves one tenant and one SCIM directory",
                )

    def bind(self, tenant_id: str, scim_url: str) -> None:
        self.check_binding(tenant_id, scim_url)
        with self._lock, self.engine.begin() as conn:
            have = {row.key for row in conn.execute(select(binding.c.key))}
            for key, value in (("tenant_id", tenant_id), ("scim_url", scim_url)):
                if key not in have:
                    conn.execute(insert(binding).values(key=key, value=value))

    # -- applied state --------------------------------------------------------------
    def load(self) -> AppliedState:
        with self.engine.connect() as conn:
            applied_users = {
                row.external_id: AppliedUser(row.scim_id, DesiredUser(**json.loads(row.record)))
                for row in conn.execute(select(users))
            }
            applied_groups = {
                row.external_id: AppliedGroup(row.scim_id, row.display_name) for row in conn.execute(select(groups))
            }
            grouped: dict[str, set[str]] = {}
            for row in conn.execute(select(members)):
                grouped.setdefault(row.group_id, set()).add(row.user_id)
        return AppliedState(applied_users, applied_groups, {g: frozenset(m) for g, m in grouped.items()})

    def save_user(self, run_id: str, operation: str, scim_id: str, user: DesiredUser) -> None:
        record = json.dumps(asdict(user), ensure_ascii=False)
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(users).where(users.c.external_id == user.external_id))
            conn.execute(insert(users).values(external_id=user.external_id, scim_id=scim_id, record=record, active=user.active))
            self._audit(conn, run_id, operation, "user", user.external_id, user.user_name, "ok")

    def save_group(self, run_id: str, operation: str, group_id: str, scim_id: str, display_name: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(groups).where(groups.c.external_id == group_id))
            conn.execute(insert(groups).values(external_id=group_id, scim_id=scim_id, display_name=display_name))
            if operation in ("create", "adopt", "rename"):
                conn.execute(delete(members).where(members.c.group_id == group_id))  # a new group starts empty
            self._audit(conn, run_id, operation, "group", group_id, display_name, "ok")

    def drop_group(self, run_id: str, group_id: str, display_name: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(groups).where(groups.c.external_id == group_id))
            conn.execute(delete(members).where(members.c.group_id == group_id))
            self._audit(conn, run_id, "delete", "group", group_id, display_name, "ok")

    def save_members(self, run_id: str, group_id: str, added: list[str], removed: list[str]) -> None:
        with self._lock, self.engine.begin() as conn:
            if removed:
                conn.execute(delete(members).where(members.c.group_id == group_id, members.c.user_id.in_(removed)))
            if added:
                conn.execute(delete(members).where(members.c.group_id == group_id, members.c.user_id.in_(added)))
                conn.execute(insert(members), [{"group_id": group_id, "user_id": uid} for uid in added])
            detail = json.dumps({"added": added, "removed": removed})
            self._audit(conn, run_id, "members", "group", group_id, None, "ok", detail)

    def record_failure(self, run_id: str, operation: str, object_type: str, object_id: str, name: str | None, detail: str) -> None:
        with self._lock, self.engine.begin() as conn:
            self._audit(conn, run_id, operation, object_type, object_id, name, "failed", detail)

    @staticmethod
    def _audit(conn, run_id, operation, object_type, object_id, name, outcome, detail=None) -> None:
        conn.execute(
            insert(audit).values(
                at=now(), run_id=run_id, operation=operation, object_type=object_type,
                object_id=object_id, object_name=name, outcome=outcome, detail=detail,
            )
        )

    # -- runs and history -------------------------------------------------------------
    def start_run(self, run_id: str, mode: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(runs).where(runs.c.run_id == run_id))  # a Prefect retry reuses the run id
            conn.execute(insert(runs).values(run_id=run_id, started_at=now(), mode=mode, status="running"))

    def finish_run(self, run_id: str, status: str, counts: dict | None = None, message: str | None = None) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(
                update(runs).where(runs.c.run_id == run_id).values(
                    finished_at=now(), status=status, counts=json.dumps(counts or {}), message=message
                )
            )

    def history(self, limit: int = 20) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.started_at.desc()).limit(limit))
            return [dict(row._mapping) | {"counts": json.loads(row.counts or "{}")} for row in rows]

    def audit_of(self, needle: str, limit: int = 200) -> list[dict]:
        """Audit rows of one user or group, by Entra id or by name (case-insensitive)."""
        with self.engine.connect() as conn:
            ids = {needle}
            for row in conn.execute(select(users.c.external_id, users.c.record)):
                if json.loads(row.record)["user_name"].casefold() == needle.casefold():
                    ids.add(row.external_id)
            query = (
                select(audit)
                .where((audit.c.object_id.in_(ids)) | (audit.c.object_name.ilike(needle)))
                .order_by(audit.c.id)
                .limit(limit)
            )
            return [dict(row._mapping) for row in conn.execute(query)]

    def dispose(self) -> None:
        self.engine.dispose()


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"
