"""The state store's schema: versioned with Alembic, upgraded on open, safe to open twice at once."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import zipfile

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from guardsync.errors import ConfigError
from guardsync.models import DesiredUser
from guardsync.state import StateStore, metadata, schema_head, schema_revision
from tests.production.stack import REPO


def _schema_differences(engine) -> list:
    """What Alembic's autogenerate would change to make the database match guardsync.state's tables."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    return [change for change in diff if not (isinstance(change, tuple) and change[0] == "remove_table"
                                              and change[1].name == "alembic_version")]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_empty_database_gets_the_schema_of_the_code(database, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'state.db'}" if database == "sqlite" else request.getfixturevalue("fresh_postgres")
    store = StateStore(url)
    try:
        assert schema_revision(store.engine) == schema_head()
        assert _schema_differences(store.engine) == []  # the migrations build exactly the tables the code uses
        indexes = {ix["name"]: ix["column_names"] for ix in sqlalchemy.inspect(store.engine).get_indexes("audit")}
        assert indexes["audit_by_run"] == ["run_id", "operation", "outcome"]
    finally:
        store.dispose()


LATER_TABLES = {"access_grants", "no_account", "held_plans"}  # added by revisions 0003, 0005 and 0006, after migrations began
LATER_COLUMNS = {"runs": {"seq"}}  # added by revision 0005


def test_a_store_made_before_migrations_is_adopted_with_its_rows(fresh_postgres):
    """A store of the guardsync before migrations (create_all, no index, no alembic_version) keeps its rows."""
    old = sqlalchemy.MetaData()
    for table in metadata.tables.values():
        if table.name not in LATER_TABLES:
            later = LATER_COLUMNS.get(table.name, set())
            sqlalchemy.Table(table.name, old, *[column.copy() for column in table.columns if column.name not in later])
    old.tables["audit"].indexes.clear()
    engine = sqlalchemy.create_engine(fresh_postgres)
    old.create_all(engine)
    user = DesiredUser("e1", "ada@contoso.com", "Ada", "Ada", "L", "", True)
    with engine.begin() as conn:
        conn.execute(old.tables["binding"].insert().values(key="tenant_id", value="t1"))
        for n, started in enumerate(("2024-05-02 10:00:00+00", "2024-05-01 10:00:00+00")):
            conn.execute(old.tables["runs"].insert().values(run_id=f"r{n}", started_at=started, mode="sync", status="completed"))
        conn.execute(old.tables["users"].insert().values(external_id="e1", scim_id="s1", active=True,
                                                         record=json.dumps(user.__dict__)))
    engine.dispose()

    store = StateStore(fresh_postgres)
    try:
        assert schema_revision(store.engine) == schema_head()
        assert store.binding() == {"tenant_id": "t1"}
        assert store.load().users["e1"].record == user
        assert [run["run_id"] for run in store.history()] == ["r0", "r1"]  # numbered in the order they started
        assert store.start_run("r1", "sync")["run_id"] == "r0"  # so a retry of r1 knows r0 ran after it
        assert _schema_differences(store.engine) == []
    finally:
        store.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_store_from_before_grant_makers_keeps_its_grants_as_guardsyncs(database, tmp_path, request):
    """Revision 0003 recorded only the grants guardsync made: upgraded, they stay guardsync's (the only ones it
    may revoke). A dry run reads such a store as it is, without migrating it."""
    from alembic import command

    from guardsync.state import _alembic_config

    url = f"sqlite:///{tmp_path / 'state.db'}" if database == "sqlite" else request.getfixturevalue("fresh_postgres")
    engine = sqlalchemy.create_engine(url)
    config = _alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        conn.execute(sqlalchemy.text("INSERT INTO access_grants (group_id, workspace_id, product) "
                                     "VALUES ('g1', 'ws-jira', 'jira-software@contoso.atlassian.net')"))
    engine.dispose()
    preview = StateStore(url, read_only=True)
    try:
        assert preview.load_grants() == {("g1", "ws-jira"): "guardsync"} and schema_revision(preview.engine) == "0003"
    finally:
        preview.dispose()
    store = StateStore(url)
    try:
        assert schema_revision(store.engine) == schema_head() and _schema_differences(store.engine) == []
        assert store.load_grants() == {("g1", "ws-jira"): "guardsync"}
        store.save_grant("run-1", "grant", "g2", "Two", "ws-jpd", "jira-product-discovery@contoso.atlassian.net", "hand")
        assert store.load_grants() == {("g1", "ws-jira"): "guardsync", ("g2", "ws-jpd"): "hand"}
        assert store.grants_confirmed_in("run-1") == {("g2", "ws-jpd")}
    finally:
        store.dispose()


def test_a_store_of_a_newer_guardsync_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="revision 9999, made by a newer guardsync; upgrade guardsync"):
        StateStore(url)


def _open_store(url: str, start, results) -> None:
    start.wait()
    try:
        StateStore(url).dispose()
        results.put("ok")
    except Exception as exc:  # report it to the test, whatever it is
        results.put(f"{type(exc).__name__}: {exc}")


def test_workers_opening_an_empty_postgres_at_once_all_succeed(fresh_postgres):
    """Four processes open the same empty database at the same moment: one migrates, the others wait and find
    the head, once (concurrent create_all calls can collide in the catalog: pg_type's unique index)."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_open_store, args=(fresh_postgres, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert outcomes == ["ok"] * 4, outcomes
    engine = sqlalchemy.create_engine(fresh_postgres)
    try:
        assert schema_revision(engine) == schema_head()
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.slow
def test_the_wheel_carries_the_migrations(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("guardsync-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("guardsync/migrations/env.py", "guardsync/migrations/script.py.mako",
                   "guardsync/migrations/versions/0001_initial.py", "guardsync/migrations/versions/0002_audit_lookups.py"):
        assert needed in names, needed
