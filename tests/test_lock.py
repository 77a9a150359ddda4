"""The directory lock on PostgreSQL: one holder at a time, a lease renewed while the run lives, a killed
holder waited out (elsewhere) or taken over (on this machine), released on every exit path."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
import sqlalchemy

from guardsync.run import DirectoryRun
from guardsync.state import DirectoryBusy, StateStore, locks, now

LEASE = timedelta(seconds=2)
BEAT = timedelta(seconds=0.3)


def _hold(url: str, run_id: str, pid_space: str | None, start, entered, results, hold_seconds: float) -> None:
    """A worker: wait for the start, try to take the directory, hold it for a while (or until killed)."""
    import guardsync.state

    if pid_space is not None:
        guardsync.state.PID_SPACE = pid_space  # this process stands for one on another host or container
    store = StateStore(url)
    start.wait()
    run = DirectoryRun(store, run_id, dry_run=False, lease=LEASE, heartbeat_every=BEAT)
    try:
        run.enter()
        results.put((run_id, "holds"))
        entered.set()
        time.sleep(hold_seconds)
    except DirectoryBusy as exc:
        results.put((run_id, f"busy: {exc}"))
    finally:
        run.finish("completed")


def _spawn(url, run_id, start, entered, results, pid_space=None, hold_seconds=3.0):
    process = multiprocessing.get_context("spawn").Process(
        target=_hold, args=(url, run_id, pid_space, start, entered, results, hold_seconds))
    process.start()
    return process


@pytest.fixture
def mp():
    context = multiprocessing.get_context("spawn")
    return context.Event, context.Queue


def test_two_workers_starting_one_directory_at_once_one_holds_it(fresh_postgres, mp):
    StateStore(fresh_postgres).dispose()  # the schema exists; the race is about the lock
    Event, Queue = mp
    start, results, entered = Event(), Queue(), [Event(), Event()]  # kept: a child unpickles them after start()
    workers = [_spawn(fresh_postgres, f"run-{n}", start, entered[n - 1], results) for n in (1, 2)]
    start.set()
    outcomes = dict(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(30)
    assert sorted(o.split(":")[0] for o in outcomes.values()) == ["busy", "holds"], outcomes
    holder = next(run for run, o in outcomes.items() if o == "holds")
    loser = next(o for o in outcomes.values() if o != "holds")
    assert holder in loser and "wait for it to finish" in loser
    assert _lock_rows(fresh_postgres) == []  # the holder released it when it finished


def test_a_live_holder_renews_its_lease_and_a_killed_one_elsewhere_is_waited_out(fresh_postgres, mp):
    Event, Queue = mp
    start, entered, results = Event(), Event(), Queue()
    holder = _spawn(fresh_postgres, "holder", start, entered, results, pid_space="another-host", hold_seconds=600)
    start.set()
    assert entered.wait(60)
    store = StateStore(fresh_postgres)
    try:
        time.sleep(LEASE.total_seconds() * 2)  # twice its lease: alive, it renewed it
        with pytest.raises(DirectoryBusy, match="another run \\(holder"):
            store.acquire_lock("contender", LEASE)
        os.kill(holder.pid, signal.SIGKILL)  # killed on "another host": no pid to ask after there
        holder.join(10)
        with pytest.raises(DirectoryBusy):
            store.acquire_lock("contender", LEASE)  # its lease still runs
        deadline = time.monotonic() + LEASE.total_seconds() * 5
        while True:
            try:
                store.acquire_lock("contender", LEASE)
                break
            except DirectoryBusy:
                assert time.monotonic() < deadline, "the dead holder's lease never ran out"
                time.sleep(0.2)
        assert [row.run_id for row in _lock_rows(fresh_postgres)] == ["contender"]
    finally:
        store.dispose()


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(fresh_postgres, mp):
    Event, Queue = mp
    start, entered, results = Event(), Event(), Queue()
    holder = _spawn(fresh_postgres, "holder", start, entered, results, hold_seconds=600)
    start.set()
    assert entered.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    store = StateStore(fresh_postgres)
    try:
        store.acquire_lock("contender", timedelta(minutes=10))  # its pid is gone from this pid space
        assert [row.run_id for row in _lock_rows(fresh_postgres)] == ["contender"]
    finally:
        store.dispose()


def test_a_container_sharing_this_hostname_keeps_its_lock(fresh_postgres):
    """Its pid means nothing here: that no process of this machine has it does not make the holder dead."""
    store = StateStore(fresh_postgres)
    dead_here = 4_000_000  # above any pid_max: no process of this machine has it
    with store.engine.begin() as conn:
        conn.execute(locks.insert().values(name="directory", holder=f"{socket.gethostname()}:{dead_here}:othercontainer:1a2b",
                                           run_id="in-a-container", acquired_at=now(), expires_at=now() + timedelta(minutes=10)))
    try:
        with pytest.raises(DirectoryBusy, match="in-a-container"):
            store.acquire_lock("contender")
    finally:
        store.dispose()


def test_a_run_that_fails_right_after_taking_the_lock_releases_it(sandbox, tmp_path, sync):
    """The run record cannot be written (a trigger refuses it): the run fails, and the lock is not left held."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TRIGGER no_runs BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="refused"):
        sync(sandbox.settings(url))
    assert _lock_rows(url) == []
    store.dispose()


def _lock_rows(url: str) -> list:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.select(locks)))
    finally:
        engine.dispose()
