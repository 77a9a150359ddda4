"""Shared fixtures: one Prefect test server per session, a fresh sandbox per test.

Everything runs over loopback: a Graph emulator and an Atlassian SCIM server behind
HTTPS with a CA made at start; msal asks the emulator's token endpoint for real.
"""

import os
import tempfile

# Before Prefect or GX load: nothing phones home, Prefect keeps its files in a temp home.
_home = tempfile.mkdtemp(prefix="guardsync-tests-prefect-")
os.environ.update(
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
    PREFECT_HOME=_home,
    PREFECT_LOGGING_LEVEL="WARNING",
)

import pytest  # noqa: E402

from guardsync.errors import GuardsyncError  # noqa: E402
from guardsync.sandbox.stack import Sandbox  # noqa: E402
from guardsync.sandbox.tenant import generate_tenant  # noqa: E402
from guardsync.summary import RunSummary  # noqa: E402

DOMAINS = ("contoso.com", "fabrikam.com")


# Turning task-run events into task-run rows is most of a test server's CPU (about 0.7 s of each sync run
# here, three times the flow's own Prefect overhead). The session's server keeps the events and skips the rows:
# tests read a run's task runs from its events (task_run_events), which are what a server records them from.
NO_TASK_RUN_ROWS = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED"


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    harness = prefect_test_harness(server_startup_timeout=120)
    os.environ[NO_TASK_RUN_ROWS] = "false"  # for the server process only: not for the servers tests start
    try:
        harness.__enter__()
    finally:
        del os.environ[NO_TASK_RUN_ROWS]
    try:
        yield
    finally:
        harness.__exit__(None, None, None)


def task_run_events(flow_run_id, at_least: set[str] = frozenset(), wait_seconds: float = 60) -> list[dict]:
    """The task-run events the test server holds for a flow run, oldest first; they reach it a moment after the
    run: wait until tasks named `at_least` ("extract", ...) have one."""
    import time
    from datetime import datetime, timedelta, timezone

    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"prefix": ["prefect.task-run."]},
                       "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                       "occurred": {"since": (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()},
                       "order": "ASC"}, "limit": 50}
    deadline = time.monotonic() + wait_seconds
    while True:
        events, page = [], httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10).raise_for_status().json()
        while True:
            events += page["events"]
            if not page.get("next_page"):
                break
            page = httpx.get(page["next_page"], timeout=10).raise_for_status().json()
        if at_least <= {task_name(event) for event in events} or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def task_name(event: dict) -> str:
    """The task of a task-run event: its run's name without the suffix ("extract-3a1" -> "extract")."""
    return event["resource"].get("prefect.resource.name", "").rsplit("-", 1)[0]


@pytest.fixture
def make_sandbox(monkeypatch):
    started = []

    def make(users=120, groups=10, seed=11, atlassian_domains=DOMAINS, **tenant_options):
        tenant = generate_tenant(users=users, groups=groups, seed=seed, domains=DOMAINS, **tenant_options)
        sandbox = Sandbox(tenant, atlassian_domains=set(atlassian_domains)).start()
        started.append(sandbox)
        for name, value in sandbox.environment().items():
            monkeypatch.setenv(name, value)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def sandbox(make_sandbox):
    return make_sandbox()


@pytest.fixture
def state_url(tmp_path):
    return f"sqlite:///{tmp_path / 'state.db'}"


def run_sync(settings, flow=None, **options):
    """Run the flow in-process (inside the session's Prefect server): (exit status, RunSummary or the error).
    `flow`: the flow with other options (e.g. `sync_directory.with_options(retries=1)`)."""
    from flows.sync_directory import WritesFailed, sync_directory

    try:
        return 0, RunSummary(**(flow or sync_directory)(settings=settings, **options))
    except WritesFailed as exc:
        return 1, exc.summary
    except GuardsyncError as exc:
        return exc.exit_code, exc


@pytest.fixture
def sync(prefect_server):
    """Run the flow in-process: (exit status, RunSummary or the error)."""
    return run_sync


@pytest.fixture
def fresh_postgres():
    """The URL of a new, empty PostgreSQL database on this machine's server, dropped afterwards."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    name = f"guardsync_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def pytest_terminal_summary(terminalreporter):
    """Tests that measure themselves (the model test: histories, steps, runs) say so at the end of the run,
    also under xdist (a report's user_properties travel from the worker)."""
    lines = [f"{report.nodeid}: {value}" for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "measured"]
    if lines:
        terminalreporter.write_sep("-", "measured")
        for line in lines:
            terminalreporter.write_line(line)
