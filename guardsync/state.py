"""The state store: what guardsync applied to Atlassian, and the audit of every write.

SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (shared deployments).
Every successful write is recorded together with its audit row, right after it
succeeds; the loader hands over user creates/updates and member PATCHes a batch at
a time (see guardsync.load): a run killed at any point resumes from here.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import zlib
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from importlib.resources import files
from typing import NamedTuple

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    literal,
    or_,
    select,
    func,
    text,
    update,
)
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from guardsync.config import redacted_url
from guardsync.errors import ConfigError, GuardsyncBlocked, GuardsyncError
import pandas as pd

from guardsync.models import DesiredUser, Snapshot, text_frame
from guardsync.models import AppliedGroup, AppliedState, AppliedUser

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
members = members_table = Table(  # members_table where a parameter is named members
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
    # The order runs started in, given by the database (a worker's clock can be off): a retry asks whether
    # another run started after it by this, never by started_at.
    Column("seq", Integer),
)
audit = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("object_type", String(16), nullable=False),
    Column("object_id", Text, nullable=False),  # an Entra id, or a userName when a write failed
    Column("object_name", Text),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text),
    Index("audit_by_run", "run_id", "operation", "outcome"),  # a resumed load asks for its run's writes
)


locks = Table(
    "locks", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),  # host:pid of the process holding it
    Column("run_id", String(64), nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

mirror = Table(  # the last Entra snapshot and Graph delta links: a delta run merges into it
    "mirror", metadata,
    Column("key", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

no_account = Table(  # disabled users in scope that Atlassian was seen to hold no account for
    "no_account", metadata,
    Column("external_id", String(64), primary_key=True),  # Entra user id
    Column("user_name", Text, nullable=False),  # the identifier looked up: a renamed user is looked up again
)

access_grants = Table(  # the grant ledger: the product grants of synced groups guardsync knows of, with their maker
    "access_grants", metadata,
    Column("group_id", String(64), primary_key=True),  # Entra group id: a rename keeps it, and the grant its maker
    Column("workspace_id", String(255), primary_key=True),
    Column("product", Text, nullable=False),  # key@site-host, for people
    # "guardsync" (only these may be revoked) or "hand"; rows from before makers were kept are guardsync's
    Column("maker", String(16), nullable=False, server_default="guardsync"),
    # the run whose assign Atlassian confirmed last; None: seen, made by hand (or kept from before makers were);
    # INTENT + a run: asked for by that run, not confirmed yet (StateStore.intend_grant)
    Column("run_id", String(64)),
)
INTENT = "intent:"

held_plans = Table(  # plans an approvable guard held for a person (DESIGN.md, "Approval"): the approval's audit
    "held_plans", metadata,
    Column("run_id", String(64), primary_key=True),  # the run that made the plan and was blocked
    Column("digest", String(64), nullable=False),  # of exactly what the plan changes (tasks/approval.py)
    Column("rules", Text, nullable=False),  # the guards it trips, comma-separated
    Column("message", Text, nullable=False),
    Column("counts", Text, nullable=False),  # JSON: the plan's counts, as shown
    Column("full_read", Boolean, nullable=False),  # a terminal approval reads Entra and Atlassian as this run did
    Column("held_at", DateTime(timezone=True), nullable=False),
    # waiting (paused in Prefect for an answer) | held (blocked; approvable from the terminal) | approved |
    # applied | rejected | expired (no answer in time; still approvable from the terminal)
    Column("status", String(16), nullable=False),
    Column("decided_at", DateTime(timezone=True)),
    Column("decided_by", Text),  # the name the approver gave (the form), or the terminal's user
    Column("reason", Text),
    Column("applied_by", String(64)),  # the run that applied it: itself (the UI), or a `guardsync approve` run
)

HELD_STATUSES = ("waiting", "held", "approved", "applied", "rejected", "expired")


class Mirror(NamedTuple):
    """The Entra side as the last run left it: a delta run merges into it."""

    snapshot: Snapshot | None  # None also when read without it (load_mirror(snapshot=False))
    links: dict
    last_full_read: datetime | None
    generation: int  # moves on with every save: a save over a generation it did not read from is refused
    user_columns: tuple[str, ...] | None = None  # the snapshot's users columns; None: there is no snapshot


IN_LIST_LIMIT = 10_000  # ids per IN (...): SQLite takes at most 32,766 parameters a statement
LOCK_LEASE = timedelta(minutes=10)  # renewed while the run lives; a vanished holder elsewhere frees it after this


def _pid_space() -> str:
    """Which process-id space this process lives in: the machine's boot and its PID namespace. Two containers
    sharing a hostname differ in the namespace, two hosts in the boot id; only within one space is a pid a
    process (of this space) to ask after."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()[:8]}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"  # not Linux: a killed holder is waited out to the end of its lease


PID_SPACE = _pid_space()
_HOLDERS: dict[int, str] = {}


def lock_holder() -> str:
    """This process's identity as a lock holder: host and pid for people, the pid space for the liveness
    check, and a random token, so no other process (a forked child included) is ever taken for this one."""
    return _HOLDERS.setdefault(os.getpid(), f"{socket.gethostname()[:120]}:{os.getpid()}:{PID_SPACE}:{secrets.token_hex(8)}")


class DirectoryBusy(GuardsyncError):
    """Another run is syncing this directory right now."""


class WaitingForApproval(DirectoryBusy):
    """The run holding the directory waits for a person to approve or reject its plan."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def database_now(conn) -> datetime:
    """The database's clock (UTC): leases are timed by it, so workers whose clocks differ agree on them.
    SQLite's clock is the machine's own (it has no server); PostgreSQL's is the server's."""
    if conn.dialect.name == "sqlite":
        stamp = conn.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar()
        return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc)
    return _utc(conn.execute(select(func.now())).scalar())


def _utc(stamp: datetime) -> datetime:
    return stamp.astimezone(timezone.utc) if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(connection, _record):  # WAL: readers never block the writer; one fsync per checkpoint
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


def _refuse_writes(engine: Engine) -> None:
    """Read-only sessions, enforced by the database itself: no code path of a dry run can write."""
    statement = "PRAGMA query_only = ON" if engine.dialect.name == "sqlite" else "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"

    @event.listens_for(engine, "connect")
    def _on_connect(connection, _record):
        cursor = connection.cursor()
        cursor.execute(statement)
        cursor.close()


MIGRATIONS = files("guardsync") / "migrations"  # package data: a wheel install has them too


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def schema_head() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_schema(engine: Engine) -> None:
    """Bring the store to the schema this guardsync expects (Alembic's head), in one transaction.

    An empty database gets the whole schema; a store made before migrations existed is adopted
    (revision 0001 creates only what it lacks); a store at the head is left alone. A store
    migrated by a newer guardsync is refused rather than written with an older shape.
    """
    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    current = schema_revision(engine)
    if current == script.get_current_head():
        return
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise ConfigError(f"[sync] state: the store's schema is at revision {current}, made by a newer guardsync; "
                          "upgrade guardsync on this machine (a store is never migrated backwards)")
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                config.attributes["connection"] = conn
                alembic_command.upgrade(config, "head")
            return
        except OperationalError:  # SQLite: another process created the schema at the same moment
            if engine.dialect.name != "sqlite" or attempt == 2:
                raise


def _keep_private(engine: Engine) -> None:
    """A SQLite store holds the tenant's names and addresses: readable by its owner only (its -wal
    and -shm files take the same mode)."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return
    path = engine.url.database
    try:
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass  # a missing directory, another user's file: opening it says what is wrong


class StateStore:
    """Applied state, bindings, runs and audit, behind one small API."""

    def __init__(self, url: str, read_only: bool = False):
        """`read_only` (dry runs): every session refuses writes, and a store that does not exist yet
        is not created: it reads as an empty one (an in-memory database nobody else sees)."""
        try:
            self.engine = create_engine(url, future=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"[sync] state: cannot use {redacted_url(url)} ({type(exc).__name__}); give a SQLAlchemy URL such as sqlite:///guardsync-state.db") from None
        self._lock = threading.Lock()  # loader threads share one store; writes are serialised
        try:
            if read_only and not self._exists():
                self.engine.dispose()
                self.engine = create_engine("sqlite://", future=True)
                metadata.create_all(self.engine)
            elif self.engine.dialect.name == "sqlite":
                _sqlite_pragmas(self.engine)
            if read_only:  # a store behind the schema's head is read as it is: a dry run migrates nothing
                _refuse_writes(self.engine)
            else:
                _keep_private(self.engine)
                upgrade_schema(self.engine)
        except SQLAlchemyError as exc:
            raise ConfigError(f"[sync] state: cannot open {redacted_url(url)} ({type(exc).__name__}); check the database is reachable and the URL") from None

    def _exists(self) -> bool:
        """Does the store hold guardsync's tables? Asked without creating anything (SQLite would create the file)."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            if not os.path.exists(url.database):
                return False
        return inspect(self.engine).has_table("runs")

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

    # -- a settled directory: the last run completed, nothing changed since ----------------
    def is_settled(self, digest: str) -> bool:
        return self.binding().get("settled") == digest

    def settle(self, digest: str | None) -> None:
        """Mark the directory settled under `digest` (the run's settings), or unsettled (None):
        unsettled from before a run writes until it completes, so a failed run is never skipped over."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(binding).where(binding.c.key == "settled"))
            if digest is not None:
                conn.execute(insert(binding).values(key="settled", value=digest))

    # -- an observing run that did not complete: the next run observes Atlassian again ------
    def observation_pending(self) -> bool:
        return "observe_pending" in self.binding()

    def set_observation_pending(self, pending: bool) -> None:
        """Set before an observing run writes, cleared when its loads all succeed: what it adopted or
        deactivated from its observation (not recorded until written) is seen again after a kill."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(binding).where(binding.c.key == "observe_pending"))
            if pending:
                conn.execute(insert(binding).values(key="observe_pending", value="1"))

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

    def save_users(self, run_id: str, written: list[tuple[str, str, DesiredUser]]) -> None:
        """Record users written to Atlassian, (operation, scim id, record) each, with their audit rows."""
        if not written:
            return
        rows = [{"external_id": user.external_id, "scim_id": scim_id, "record": json.dumps(asdict(user), ensure_ascii=False),
                 "active": user.active} for _, scim_id, user in written]
        audits = [_audit_row(run_id, operation, "user", user.external_id, user.user_name, "ok")
                  for operation, _, user in written]
        created = [user.external_id for operation, _, user in written if operation == "create"]
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(users).where(users.c.external_id.in_([row["external_id"] for row in rows])))
            conn.execute(insert(users), rows)
            if created:  # a new account is in no group yet (an account re-created after a hand deletion included)
                conn.execute(delete(members).where(members.c.user_id.in_(created)))
            conn.execute(insert(audit), audits)

    def hand_over(self, run_id: str, from_id: str, scim_id: str, user: DesiredUser) -> None:
        """The account `scim_id` of Entra user `from_id` now belongs to `user` (its identifier passed on):
        one transaction, so two Entra ids never share one account, and the account's groups go with it."""
        row = {"external_id": user.external_id, "scim_id": scim_id, "record": json.dumps(asdict(user), ensure_ascii=False),
               "active": user.active}
        with self._lock, self.engine.begin() as conn:
            # The old user's row goes only if it still points at this account: a renamed old user
            # may already hold a new account of its own, created in the same stage.
            conn.execute(delete(users).where(users.c.external_id == from_id, users.c.scim_id == scim_id))
            conn.execute(delete(users).where(users.c.external_id == user.external_id))
            conn.execute(insert(users), [row])
            conn.execute(delete(members).where(members.c.user_id == user.external_id))
            conn.execute(update(members).where(members.c.user_id == from_id).values(user_id=user.external_id))
            self._audit(conn, run_id, "handover", "user", user.external_id, user.user_name, "ok",
                        json.dumps({"from": from_id, "scim_id": scim_id}))

    def forget_users(self, run_id: str, user_ids: list[str]) -> None:
        """Managed accounts deleted by hand in Atlassian whose users left: recorded as gone (never re-created)."""
        if not user_ids:
            return
        with self._lock, self.engine.begin() as conn:
            names = {row.external_id: json.loads(row.record)["user_name"]
                     for row in conn.execute(select(users).where(users.c.external_id.in_(user_ids)))}
            conn.execute(delete(users).where(users.c.external_id.in_(user_ids)))
            conn.execute(delete(members).where(members.c.user_id.in_(user_ids)))
            if names:
                conn.execute(insert(audit), [_audit_row(run_id, "gone", "user", uid, name, "ok",
                                                        "deleted by hand in Atlassian") for uid, name in names.items()])

    def save_group(self, run_id: str, operation: str, group_id: str, scim_id: str, display_name: str,
                   members: frozenset[str] = frozenset()) -> None:
        """Record a group; a created or renamed one starts empty, an adopted one with the `members` it holds."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(groups).where(groups.c.external_id == group_id))
            conn.execute(insert(groups).values(external_id=group_id, scim_id=scim_id, display_name=display_name))
            if operation in ("create", "adopt", "adopt_existing", "rename"):
                conn.execute(delete(members_table).where(members_table.c.group_id == group_id))
            if members:
                conn.execute(insert(members_table), [{"group_id": group_id, "user_id": uid} for uid in sorted(members)])
            self._audit(conn, run_id, operation, "group", group_id, display_name, "ok")

    def drop_group(self, run_id: str, group_id: str, display_name: str, operation: str = "delete") -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(groups).where(groups.c.external_id == group_id))
            conn.execute(delete(members).where(members.c.group_id == group_id))
            self._audit(conn, run_id, operation, "group", group_id, display_name, "ok")

    def save_members(self, run_id: str, changes: list[tuple[str, list[str], list[str]]], operation: str = "members") -> None:
        """Record member PATCHes that Atlassian applied: (group id, user ids added, user ids removed) each.
        `operation` "members" marks the groups' members done for this run (a retried load skips them)."""
        if not changes:
            return
        with self._lock, self.engine.begin() as conn:
            for group_id, added, removed in changes:
                touched = added + removed
                for start in range(0, len(touched), IN_LIST_LIMIT):
                    conn.execute(delete(members).where(members.c.group_id == group_id,
                                                       members.c.user_id.in_(touched[start : start + IN_LIST_LIMIT])))
                if added:
                    conn.execute(insert(members), [{"group_id": group_id, "user_id": uid} for uid in added])
            conn.execute(insert(audit), [
                _audit_row(run_id, operation, "group", group_id, None, "ok", json.dumps({"added": added, "removed": removed}))
                for group_id, added, removed in changes])

    def done_in_run(self, run_id: str, operations: tuple[str, ...]) -> set[str]:
        """Objects this run already wrote with one of `operations`: a retried load skips them."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit.c.object_id).where(
                audit.c.run_id == run_id, audit.c.outcome == "ok", audit.c.operation.in_(operations)))
            return {row.object_id for row in rows}

    def note(self, run_id: str, operation: str, object_type: str, object_id: str, name: str | None, detail: str) -> None:
        with self._lock, self.engine.begin() as conn:
            self._audit(conn, run_id, operation, object_type, object_id, name, "ok", detail)

    def record_failure(self, run_id: str, operation: str, object_type: str, object_id: str, name: str | None, detail: str) -> None:
        with self._lock, self.engine.begin() as conn:
            self._audit(conn, run_id, operation, object_type, object_id, name, "failed", detail)

    @staticmethod
    def _audit(conn, run_id, operation, object_type, object_id, name, outcome, detail=None) -> None:
        conn.execute(insert(audit).values(**_audit_row(run_id, operation, object_type, object_id, name, outcome, detail)))

    # -- product access ([access]): the grant ledger ------------------------------------------
    def load_grants(self) -> dict[tuple[str, str], str]:
        """The maker ("guardsync" or "hand") of each (Entra group id, workspace id) grant in the ledger."""
        inspector = inspect(self.engine)
        if not inspector.has_table("access_grants"):
            return {}  # a dry run over a store from before [access] existed (read-only: not created)
        # A dry run reads a store behind the schema's head as it is: before makers were kept, every row was guardsync's.
        kept = any(column["name"] == "maker" for column in inspector.get_columns("access_grants"))
        maker = access_grants.c.maker if kept else literal("guardsync").label("maker")
        with self.engine.connect() as conn:
            rows = conn.execute(select(access_grants.c.group_id, access_grants.c.workspace_id, maker))
            return {(row.group_id, row.workspace_id): row.maker for row in rows}

    def grants_confirmed_in(self, run_id: str) -> set[tuple[str, str]]:
        """(group id, workspace id) of the assigns of this run that Atlassian confirmed: a retried load skips them."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(access_grants.c.group_id, access_grants.c.workspace_id)
                                .where(access_grants.c.run_id == run_id))
            return {(row.group_id, row.workspace_id) for row in rows}

    def save_grant(self, run_id: str, operation: str, group_id: str, group_name: str, workspace_id: str,
                   product: str, maker: str) -> None:
        """A grant ("grant") or revocation ("revoke") Atlassian confirmed, with its audit row. A grant keeps the
        maker it is given: a hand-made grant carried to a renamed group stays hand-made."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(access_grants).where(access_grants.c.group_id == group_id,
                                                     access_grants.c.workspace_id == workspace_id))
            if operation == "grant":
                conn.execute(insert(access_grants).values(group_id=group_id, workspace_id=workspace_id, product=product,
                                                          maker=maker, run_id=run_id))
            self._audit(conn, run_id, operation, "group", group_id, group_name, "ok",
                        f"{product} ({workspace_id})" + (f", made by {maker}" if maker != "guardsync" else ""))

    def intend_grant(self, run_id: str, group_id: str, workspace_id: str, product: str, maker: str) -> bool:
        """The ledger row of a grant about to be asked for, with its maker, marked unconfirmed (run_id INTENT + the
        run), unless the ledger has a confirmed row. True when the row is an unconfirmed intent: the caller takes it
        back (drop_intended_grant) when Atlassian refuses the grant, also one an earlier run left after an error
        that said neither yes nor no. No audit row: save_grant writes that, and confirms the row."""
        with self._lock, self.engine.begin() as conn:
            row = conn.execute(select(access_grants.c.maker, access_grants.c.run_id).where(
                access_grants.c.group_id == group_id, access_grants.c.workspace_id == workspace_id)).first()
            if row is not None:
                return (row.run_id or "").startswith(INTENT) and row.maker == maker
            conn.execute(insert(access_grants).values(group_id=group_id, workspace_id=workspace_id, product=product,
                                                      maker=maker, run_id=f"{INTENT}{run_id}"[:64]))
            return True

    def drop_intended_grant(self, group_id: str, workspace_id: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(access_grants).where(access_grants.c.group_id == group_id,
                                                     access_grants.c.workspace_id == workspace_id,
                                                     access_grants.c.run_id.startswith(INTENT)))

    def note_hand_made(self, run_id: str, seen: list[tuple[str, str, str, str]]) -> None:
        """Grants seen on a synced group that guardsync did not make, (group id, group name, workspace id, product)
        each: in the ledger as hand-made, so they stay so whatever happens to the group (a rename included).
        A row the ledger has by now (a renamed group's grant, carried this run with its maker) stays as it is."""
        if not seen:
            return
        with self._lock, self.engine.begin() as conn:
            have = {(row.group_id, row.workspace_id) for row in conn.execute(
                select(access_grants.c.group_id, access_grants.c.workspace_id)
                .where(access_grants.c.group_id.in_(sorted({group_id for group_id, *_ in seen}))))}
            new = [(group_id, name, workspace_id, product) for group_id, name, workspace_id, product in seen
                   if (group_id, workspace_id) not in have]
            if not new:
                return
            conn.execute(insert(access_grants), [{"group_id": group_id, "workspace_id": workspace_id, "product": product,
                                                  "maker": "hand", "run_id": None} for group_id, _, workspace_id, product in new])
            conn.execute(insert(audit), [_audit_row(run_id, "hand_grant", "group", group_id, name, "ok",
                                                    f"{product} ({workspace_id}), made by hand")
                                         for group_id, name, workspace_id, product in new])

    def forget_grants(self, run_id: str, gone: list[tuple[str, str]]) -> None:
        """Drop ledger rows of grants that are gone without a revocation (their group was deleted, or a person removed them)."""
        if not gone:
            return
        with self._lock, self.engine.begin() as conn:
            for group_id, workspace_id in gone:
                conn.execute(delete(access_grants).where(access_grants.c.group_id == group_id,
                                                         access_grants.c.workspace_id == workspace_id))
            conn.execute(insert(audit), [_audit_row(run_id, "forget_grant", "group", group_id, None, "ok", workspace_id)
                                         for group_id, workspace_id in gone])

    # -- disabled users without an account (what a delta run need not look up again) ----------
    def load_no_account(self) -> dict[str, str]:
        """Entra id -> identifier of the disabled users Atlassian was seen to hold no account for."""
        if not inspect(self.engine).has_table("no_account"):
            return {}  # a dry run over a store from before the table existed (read-only: not created)
        with self.engine.connect() as conn:
            return {row.external_id: row.user_name for row in conn.execute(select(no_account))}

    def keep_no_account(self, found: dict[str, str], replace: bool = False) -> None:
        """Keep these users as seen without an account; `replace`: they are all of them (a full read)."""
        if not found and not replace:
            return
        with self._lock, self.engine.begin() as conn:
            if replace:
                conn.execute(delete(no_account))
            elif found:
                conn.execute(delete(no_account).where(no_account.c.external_id.in_(list(found))))
            if found:
                conn.execute(insert(no_account), [{"external_id": k, "user_name": v} for k, v in found.items()])

    def group_names(self) -> dict[str, str]:
        """Entra group id -> the name of its group in Atlassian, as recorded (a rename is recorded once the old group went)."""
        with self.engine.connect() as conn:
            return {row.external_id: row.display_name for row in conn.execute(select(groups.c.external_id, groups.c.display_name))}

    def access_check(self) -> dict[str, list[str]] | None:
        """What the last run with [access] left each configured group holding: Organizations API group id ->
        workspace ids. A run with no change in Entra reads those groups' grants against it (None: nothing recorded)."""
        value = self.binding().get("access_check")
        return json.loads(value) if value is not None else None

    def save_access_check(self, expected: dict[str, list[str]] | None) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(binding).where(binding.c.key == "access_check"))
            if expected is not None:
                conn.execute(insert(binding).values(key="access_check", value=json.dumps(expected, sort_keys=True)))

    # -- the Entra mirror (delta sync) ----------------------------------------------------
    def load_mirror(self, snapshot: bool = True) -> Mirror:
        """The last snapshot, its delta links, the time of the last full read and the mirror's generation.

        `snapshot=False` leaves the snapshot unread (decoding it is most of a quiet run's work at 10k users
        and more): the links and the users' columns tell whether a delta round can follow, and a run that
        finds changes reads it then (load_snapshot). A mirror saved before the columns were kept is read whole."""
        with self.engine.connect() as conn:
            meta = self._mirror_meta(conn)
            held = conn.execute(select(mirror.c.key).where(mirror.c.key == "snapshot")).first() is not None
        generation = meta.get("generation", 0)
        if not held:
            return Mirror(None, {}, _last_full_read(meta), generation)
        decoded = self.load_snapshot() if snapshot or "user_columns" not in meta else None
        columns = tuple(decoded.users.columns if decoded is not None else meta["user_columns"])
        return Mirror(decoded if snapshot else None, meta.get("links", {}), _last_full_read(meta), generation, columns)

    def load_snapshot(self) -> Snapshot | None:
        with self.engine.connect() as conn:
            data = conn.execute(select(mirror.c.data).where(mirror.c.key == "snapshot")).scalar()
        return _decode_snapshot(data) if data is not None else None

    def save_mirror(self, snapshot: Snapshot, links: dict, full_read: bool, based_on: int) -> bool:
        """Keep the merged snapshot and the new delta links together, in one transaction; the mirror's
        generation moves on. Only over the generation the snapshot was read from (`based_on`): an extract
        a retried run kept from before never goes back over a newer one (False: nothing saved)."""
        with self._lock, self.engine.begin() as conn:
            meta = self._mirror_meta(conn)
            if meta.get("generation", 0) != based_on:
                return False
            last_full = None if full_read else _last_full_read(meta)
            meta = {"links": links, "last_full_read": (now() if full_read else last_full or now()).isoformat(),
                    "generation": based_on + 1, "user_columns": list(snapshot.users.columns)}
            conn.execute(delete(mirror))
            conn.execute(delete(binding).where(binding.c.key == "settled"))  # news from Entra: not applied yet
            conn.execute(insert(mirror), [
                {"key": "snapshot", "data": _encode_snapshot(snapshot), "updated_at": now()},
                {"key": "meta", "data": json.dumps(meta).encode(), "updated_at": now()},
            ])
            return True

    def save_links(self, links: dict, based_on: int, user_columns: tuple[str, ...] | None = None) -> bool:
        """New delta links for an unchanged snapshot (Graph hands out new links every round); as save_mirror,
        only over the generation they were read from. `user_columns` (the snapshot's) completes an older mirror."""
        with self._lock, self.engine.begin() as conn:
            meta = self._mirror_meta(conn)
            if meta.get("generation", 0) != based_on:
                return False
            meta = {**meta, "links": links, "generation": based_on + 1}
            if user_columns is not None:
                meta["user_columns"] = list(user_columns)
            conn.execute(update(mirror).where(mirror.c.key == "meta").values(data=json.dumps(meta).encode(), updated_at=now()))
            return True

    @staticmethod
    def _mirror_meta(conn) -> dict:
        data = conn.execute(select(mirror.c.data).where(mirror.c.key == "meta")).scalar()
        return json.loads(data) if data else {}

    # -- one run at a time per directory ---------------------------------------------------
    def acquire_lock(self, run_id: str, lease: timedelta = LOCK_LEASE) -> None:
        """Take the directory lock, or raise DirectoryBusy naming the run that holds it.

        A lock is taken over when it is this same run (a Prefect retry), when its lease expired
        (its holder stopped renewing it), or when its holder was a process of this machine's own
        process space that no longer exists (killed). A process on another host, or in another
        container that shares this hostname, is only ever waited out to the end of its lease.
        """
        held = None
        with self._lock:
            for _attempt in range(2):
                try:
                    with self.engine.begin() as conn:
                        stamp = database_now(conn)
                        row = dict(name="directory", holder=lock_holder(), run_id=run_id, acquired_at=stamp,
                                   expires_at=stamp + lease)
                        conn.execute(insert(locks).values(**row))
                    return
                except IntegrityError:
                    pass
                with self.engine.begin() as conn:
                    held = conn.execute(select(locks).where(locks.c.name == "directory")).one_or_none()
                    if held is None:
                        continue  # released meanwhile: try again
                    stamp = database_now(conn)
                    if not _lock_is_free(held, run_id, stamp):
                        break
                    row = dict(row, acquired_at=stamp, expires_at=stamp + lease)
                    # compare-and-swap: only one of two racing takers wins
                    swapped = conn.execute(
                        update(locks)
                        .where(locks.c.name == "directory", locks.c.holder == held.holder, locks.c.run_id == held.run_id)
                        .values(**row)
                    ).rowcount
                    if swapped == 1:
                        return
        since = f", since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else ""
        raise DirectoryBusy(
            f"another run ({held.run_id if held else 'unknown'}, process {_shown_holder(held.holder) if held else '?'}{since}) "
            f"is syncing this directory; wait for it to finish (runs of one directory never interleave)"
        )

    def renew_lock(self, run_id: str, lease: timedelta = LOCK_LEASE) -> bool:
        """Extend this process's hold of the lock for `run_id`; False when it is no longer ours."""
        with self._lock, self.engine.begin() as conn:
            return conn.execute(
                update(locks).where(locks.c.name == "directory", locks.c.holder == lock_holder(), locks.c.run_id == run_id)
                .values(expires_at=database_now(conn) + lease)
            ).rowcount == 1

    def holds_lock(self, run_id: str) -> bool:
        """Does this process still hold the lock for `run_id` (no other run took it over)?"""
        with self.engine.connect() as conn:
            return conn.execute(select(locks.c.run_id).where(
                locks.c.name == "directory", locks.c.holder == lock_holder(), locks.c.run_id == run_id)).first() is not None

    def release_lock(self, run_id: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(locks).where(locks.c.name == "directory", locks.c.run_id == run_id,
                                             locks.c.holder == lock_holder()))

    def lock_holder_run(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(locks.c.run_id).where(locks.c.name == "directory")).scalar()

    # -- plans held for approval ------------------------------------------------------------
    def hold_plan(self, run_id: str, digest: str, rules: list[str], message: str, counts: dict, full_read: bool,
                  status: str) -> None:
        """Keep what a blocked run planned. A retry of that run that holds a plan again (it was rejected or
        expired, or its plan was made afresh) replaces the record: the plan held now is the one asked about."""
        values = dict(digest=digest, rules=",".join(rules), message=message, counts=json.dumps(counts),
                      full_read=full_read, held_at=now(), status=status, decided_at=None, decided_by=None, reason=None,
                      applied_by=None)
        with self._lock, self.engine.begin() as conn:
            if conn.execute(select(held_plans.c.run_id).where(held_plans.c.run_id == run_id)).first() is None:
                conn.execute(insert(held_plans).values(run_id=run_id, **values))
            else:
                conn.execute(update(held_plans).where(held_plans.c.run_id == run_id).values(**values))
            self._audit(conn, run_id, "hold", "plan", run_id, None, "ok", json.dumps({"digest": digest, "rules": rules}))

    def held_plan(self, run_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(held_plans).where(held_plans.c.run_id == run_id)).one_or_none()
            return dict(row._mapping) | {"counts": json.loads(row.counts)} if row else None

    def decide_plan(self, run_id: str, status: str, *, by: str | None = None, reason: str | None = None,
                    applied_by: str | None = None, audit_run: str | None = None) -> None:
        """A held plan's new status (approved, applied, rejected, expired), with who and why, and its audit row
        under the run that decided it (`audit_run`, else the run that held it)."""
        assert status in HELD_STATUSES, status
        values = {"status": status}
        if status in ("approved", "rejected", "expired"):
            values |= {"decided_at": now(), "decided_by": by, "reason": reason}
        if applied_by is not None:
            values["applied_by"] = applied_by
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(held_plans).where(held_plans.c.run_id == run_id).values(**values))
            self._audit(conn, audit_run or run_id, status if status != "approved" else "approve", "plan", run_id, by,
                        "ok", json.dumps({"reason": reason} if reason else {}))

    def held_plans(self, limit: int = 20) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(held_plans).order_by(held_plans.c.held_at.desc()).limit(limit))
            return [dict(row._mapping) | {"counts": json.loads(row.counts)} for row in rows]

    # -- runs and history -------------------------------------------------------------
    def start_run(self, run_id: str, mode: str) -> dict | None:
        """Record the run as running. A Prefect retry reuses the run id and keeps its first start; then the
        answer is the latest other run of the directory that started after it (None when there is none)."""
        with self._lock, self.engine.begin() as conn:
            first = conn.execute(select(runs.c.seq).where(runs.c.run_id == run_id)).one_or_none()
            if first is None:
                # Runs are recorded under the directory lock, one at a time: the next number is the database's.
                seq = (conn.execute(select(func.max(runs.c.seq))).scalar() or 0) + 1
                conn.execute(insert(runs).values(run_id=run_id, started_at=now(), mode=mode, status="running", seq=seq))
                return None
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(status="running", finished_at=None))
            later = conn.execute(select(runs).where(runs.c.run_id != run_id, runs.c.mode == mode, runs.c.seq > first.seq)
                                 .order_by(runs.c.seq.desc()).limit(1)).one_or_none()
            return dict(later._mapping) if later else None

    def finish_run(self, run_id: str, status: str, counts: dict | None = None, message: str | None = None) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(
                update(runs).where(runs.c.run_id == run_id).values(
                    finished_at=now(), status=status, counts=json.dumps(counts or {}), message=message
                )
            )

    def completed_a_sync(self) -> bool:
        """Has a sync run of this store ever completed (a first run that stopped midway has not)?"""
        with self.engine.connect() as conn:
            found = conn.execute(select(runs.c.run_id).where(runs.c.mode == "sync", runs.c.status == "completed").limit(1))
            return found.first() is not None

    def history(self, limit: int = 20) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.seq.desc()).limit(limit))
            return [dict(row._mapping) | {"counts": json.loads(row.counts or "{}")} for row in rows]

    def audit_of(self, needle: str, limit: int = 200) -> list[dict]:
        """Audit rows of one user or group, by Entra id or by name (case-insensitive)."""
        with self.engine.connect() as conn:
            ids = {needle}
            for row in conn.execute(select(users.c.external_id, users.c.record)):
                if json.loads(row.record)["user_name"].casefold() == needle.casefold():
                    ids.add(row.external_id)
            mentioned = [audit.c.detail.contains(user_id) for user_id in ids if len(user_id) >= 8]  # membership changes
            query = (
                select(audit)
                .where(or_(audit.c.object_id.in_(ids), audit.c.object_name.ilike(needle), *mentioned))
                .order_by(audit.c.id)
                .limit(limit)
            )
            return [dict(row._mapping) for row in conn.execute(query)]

    def dispose(self) -> None:
        self.engine.dispose()


def _last_full_read(meta: dict) -> datetime | None:
    return datetime.fromisoformat(meta["last_full_read"]) if meta.get("last_full_read") else None


def _audit_row(run_id, operation, object_type, object_id, name, outcome, detail=None) -> dict:
    return {"at": now(), "run_id": run_id, "operation": operation, "object_type": object_type,
            "object_id": object_id, "object_name": name, "outcome": outcome, "detail": detail}


def _encode_snapshot(snapshot: Snapshot) -> bytes:
    """Compressed JSON (no pickle: the store must never be able to run code)."""
    return zlib.compress(json.dumps(snapshot_document(snapshot), ensure_ascii=False).encode(), 1)


def _decode_snapshot(data: bytes) -> Snapshot:
    return snapshot_from_document(json.loads(zlib.decompress(data)))


def snapshot_document(snapshot: Snapshot) -> dict:
    """A snapshot as a JSON document (the mirror here, the extract's persisted result in Prefect)."""
    return {
        "tenant_id": snapshot.tenant_id, "organization": snapshot.organization,
        "verified_domains": snapshot.verified_domains, "initial_domain": snapshot.initial_domain,
        **{name: frame_document(getattr(snapshot, name)) for name in ("users", "groups", "edges")},
    }


def frame_document(frame: pd.DataFrame) -> dict:
    values = frame.astype(object).where(frame.notna(), None)
    return {"columns": list(frame.columns), "data": values.to_numpy().tolist()}


def snapshot_from_document(document: dict) -> Snapshot:
    frames = {}
    for name in ("users", "groups", "edges"):
        part = document[name]
        frames[name] = text_frame(pd.DataFrame(part["data"], columns=part["columns"]), part["columns"])
    frames["users"]["accountEnabled"] = frames["users"]["accountEnabled"].fillna(False).astype(bool)
    return Snapshot(document["tenant_id"], document["organization"], frames["users"], frames["groups"], frames["edges"],
                    document["verified_domains"], document["initial_domain"])


def _lock_is_free(held, run_id: str, stamp: datetime) -> bool:
    """`stamp`: the database's clock now."""
    if held.run_id == run_id:
        return True
    if _utc(held.expires_at) < stamp:
        return True
    parts = held.holder.split(":")
    if len(parts) != 4 or PID_SPACE == "unknown":  # a holder of an older guardsync: its lease decides
        return False
    _host, pid, space, _token = parts
    return space == PID_SPACE and pid.isdigit() and not _process_alive(int(pid))


def _shown_holder(holder: str) -> str:
    """host:pid of a holder, for people."""
    return ":".join(holder.split(":")[:2])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



# == guardsync check: the state store probe ========================================================


def check_store(url: str, tenant_id: str | None, scim_url: str):
    """The "state" line: the store can be opened and belongs to this tenant and SCIM directory (or to none yet).

    Nothing is created: a SQLite file that does not exist is not opened, a database without
    guardsync's tables is not given them. `tenant_id` None: the tenant could not be read."""
    from pathlib import Path  # imported here: this section stands alone

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from guardsync.models import CheckResult

    try:
        parsed = make_url(url)
    except ArgumentError:
        return CheckResult.fail("state", "[sync] state is not a SQLAlchemy URL",
                                "give one such as sqlite:///guardsync-state.db or postgresql+psycopg://user@host/db")
    shown = redacted_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            return CheckResult.fail("state", f"{shown} is an in-memory database: nothing would survive a run",
                                    "give a file, e.g. sqlite:///guardsync-state.db, or a PostgreSQL URL")
        path = Path(database).expanduser()
        if not path.exists():  # opening it would create it: say what the first sync will do instead
            parent = path.absolute().parent
            if not parent.is_dir():
                return CheckResult.fail("state", f"{shown}: the directory {parent} does not exist",
                                        f"create {parent}, or point [sync] state at a file in an existing directory")
            if not os.access(parent, os.W_OK):
                return CheckResult.fail("state", f"{shown}: the directory {parent} is not writable",
                                        f"let this user write to {parent}, or point [sync] state elsewhere")
            return CheckResult.ok("state", f"{shown} is empty (not created yet); the first sync creates it and binds "
                                  "it to this tenant and directory")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            has_tables = inspect(connection).has_table("binding")
    except (SQLAlchemyError, ImportError) as exc:
        return CheckResult.fail("state", f"cannot open {shown} ({type(exc).__name__})",
                                "check that the database is up and reachable from here, and the URL, user and password")
    finally:
        engine.dispose()
    if not has_tables:
        return CheckResult.ok("state", f"{shown} is reachable and empty; the first sync binds it to this tenant and "
                              "directory")
    store = StateStore(url, read_only=True)  # read only: check neither migrates the store nor changes its file mode
    try:
        bound = store.binding()
        if not bound:
            return CheckResult.ok("state", f"{shown} is reachable and not bound yet; the first sync binds it")
        try:
            store.check_binding(tenant_id or bound.get("tenant_id", ""), scim_url)
        except GuardsyncBlocked as exc:
            return CheckResult.fail("state", str(exc), "point [sync] state at this tenant and directory's own store (a "
                                    "new SQLite file or database); one store serves one tenant and one SCIM directory")
        last = store.history(1)
        runs = f"; last run {last[0]['started_at']:%Y-%m-%d %H:%M} {last[0]['status']}" if last else ""
        compared = "" if tenant_id else " (tenant not compared: it could not be read)"
        return CheckResult.ok("state", f"{shown} is bound to tenant {bound.get('tenant_id')} and this directory"
                              f"{compared}{runs}")
    finally:
        store.dispose()
