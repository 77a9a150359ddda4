"""A run killed at any point, run again, ends where an uninterrupted run ends.

`guardsync sync --config FILE` runs as a real subprocess against a sandbox served by
this test process (HTTPS on loopback) and is killed with SIGKILL at a chosen point,
found by polling the SCIM server's request counters: during the users load, at the
first group create, at the first membership PATCH, and in the gap between a write
Atlassian applied and its record in the state store (the server applies the request,
then holds the answer while the child is killed). Then the run goes again to completion
(the flow in this process, on the same configuration and state store: the killed child's
lock is taken over as a dead process's), and the Atlassian state must equal that of an
uninterrupted run on an identical fresh sandbox (same tenant seed): same userNames and
attributes, same active flags, same groups with the same members, no duplicate, nothing
missing. A third run must write nothing. The uninterrupted reference is computed once per
kind of history and test process (the tenant is generated from a fixed seed).
"""

from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from guardsync.sandbox.http import Fault
from tests.test_config import GUARDSYNC, cli_env, write_config
from tests.test_faults import assert_same_state, atlassian_state, enabled_members_in_scope, nontrivial, scim_writes

pytestmark = pytest.mark.slow

USERS, GROUPS, SEED = 100, 10, 17
LATENCY = 0.04  # seconds per SCIM request while the child runs: the kill lands inside a stage, not after it
POLL = 0.002


class Child:
    """One `guardsync sync` subprocess against the sandbox, killed on a condition."""

    def __init__(self, sandbox, config: Path, home: Path, log: Path):
        self.log = log
        self.out = open(log, "w")
        self.process = subprocess.Popen([GUARDSYNC, "sync", "--config", str(config)], env=cli_env(sandbox, home),
                                        stdout=self.out, stderr=subprocess.STDOUT)

    def kill_when(self, condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended (status {self.process.returncode}) before the kill point:\n"
                                     + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError("the kill point was never reached:\n" + self.log.read_text()[-3000:])
            time.sleep(POLL)
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()  # reaped: its pid no longer holds the directory lock
        self.out.close()


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def finish(sandbox, settings, sync) -> None:
    """Run again to completion, then once more: the second must write nothing."""
    sandbox.scim.latency = 0.0
    sandbox.scim.clear_faults()
    status, summary = sync(settings)
    assert status == 0, summary
    sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert scim_writes(sandbox) == 0, sandbox.scim.requests


def recorded(state_db: Path) -> tuple[set[str], set[str]]:
    """Entra ids of the users and groups the state store has recorded."""
    with sqlite3.connect(state_db) as connection:
        users = {row[0] for row in connection.execute("SELECT external_id FROM users")}
        groups = {row[0] for row in connection.execute("SELECT external_id FROM groups")}
    return users, groups


REFERENCES: dict[str, dict] = {}  # kind of history -> the Atlassian state an uninterrupted run ends in


def reference_state(kind: str, make_reference) -> dict:
    """The uninterrupted run's end state, computed once per kind in this test process."""
    if kind not in REFERENCES:
        REFERENCES[kind] = make_reference()
    return REFERENCES[kind]


@pytest.fixture
def kill_setup(make_sandbox, sync, tmp_path, prefect_server):
    """(sandbox, config file, settings, Prefect home, expected state) for a first run of a fresh tenant."""

    def make(kind="first run", populate=None, **sync_options):
        """`populate(sandbox)`: what Atlassian holds before the first run (default: nothing); `kind` names
        the history (populate and options) for the reference."""

        def uninterrupted() -> dict:
            reference = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
            if populate:
                populate(reference)
            status, summary = sync(reference.settings(f"sqlite:///{tmp_path / 'reference.db'}", **sync_options))
            assert status == 0, summary
            reference.stop()
            return nontrivial(atlassian_state(reference))

        expected = reference_state(kind, uninterrupted)
        sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
        if populate:
            populate(sandbox)
        state = f"sqlite:///{tmp_path / 'state.db'}"
        config = write_config(tmp_path / "guardsync.toml", sandbox.config(state, **sync_options))
        return sandbox, config, sandbox.settings(state, **sync_options), tmp_path / "prefect-home", expected

    return make


# -- killed during each load stage of a first run ------------------------------------------------------


KILL_POINTS = {
    # stage: (condition on the SCIM server's counters, check that the kill really landed inside the stage)
    "users": (lambda s: s.scim.requests["POST /Users"] >= 25,
              lambda s, e: 0 < len(s.scim.users()) < len(e["users"]) and not s.scim.groups()),
    "groups": (lambda s: s.scim.requests["POST /Groups"] >= 1,
               lambda s, e: len(s.scim.users()) == len(e["users"]) and len(s.scim.groups()) < len(e["groups"])),
    "memberships": (lambda s: s.scim.requests["PATCH /Groups/{id}"] >= 1,
                    lambda s, e: len(s.scim.groups()) == len(e["groups"])
                    and sum(len(g.get("members") or []) for g in s.scim.groups()) < sum(len(m) for _, m in e["groups"].values())),
}


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_killed_during_a_load_stage_the_next_run_ends_where_an_uninterrupted_run_ends(stage, kill_setup, children, tmp_path, sync):
    sandbox, config, settings, home, expected = kill_setup()
    condition, landed = KILL_POINTS[stage]
    sandbox.scim.latency = LATENCY
    child = Child(sandbox, config, home, tmp_path / "killed.log")
    children.append(child)
    child.kill_when(lambda: condition(sandbox))
    time.sleep(3 * LATENCY)  # requests in flight when the child died reach the server and are applied
    assert child.process.returncode == -signal.SIGKILL
    assert landed(sandbox, expected), f"the kill did not land inside the {stage} load"
    finish(sandbox, settings, sync)
    assert_same_state(atlassian_state(sandbox), expected)


# -- killed during a first run against a directory that already holds the people ------------------------


BROWNFIELD_KILLS = {
    # the adoptions (PUTs of existing accounts: externalId, stale titles, the leavers' deactivations) ...
    "adoptions": lambda s: s.scim.requests["PUT /Users/{id}"] >= 8,
    # ... the creates of the users who had no account, the group adoption and creates, the memberships
    "creates": lambda s: s.scim.requests["POST /Users"] >= 10,
    "groups": lambda s: s.scim.requests["POST /Groups"] >= 1,
    "memberships": lambda s: s.scim.requests["PATCH /Groups/{id}"] >= 3,
}


@pytest.mark.parametrize("point", list(BROWNFIELD_KILLS))
def test_killed_during_a_brownfield_first_run_the_next_run_ends_as_an_uninterrupted_one(point, kill_setup, children, tmp_path, sync):
    from tests.test_brownfield import PopulatedWorld

    worlds = []
    sandbox, config, settings, home, expected = kill_setup(
        "brownfield first run", populate=lambda s: worlds.append(PopulatedWorld(s)), max_deactivations=5)
    world = worlds[-1]
    assert all(expected["users"][upn][1] is False for upn in world.disabled)  # the reference deactivated the leavers
    sandbox.scim.latency = LATENCY
    child = Child(sandbox, config, home, tmp_path / "killed.log")
    children.append(child)
    child.kill_when(lambda: BROWNFIELD_KILLS[point](sandbox))
    time.sleep(3 * LATENCY)
    finish(sandbox, settings, sync)
    assert_same_state(atlassian_state(sandbox), expected)
    assert sandbox.scim.get_user(world.foreign_user_id) == world.foreign_user  # never touched, killed or not


# -- killed between a write Atlassian applied and its record ---------------------------------------------


GAPS = {
    # what: (counter to wait for, fault that applies the next such request and holds its answer)
    "user create": ("POST /Users", 10, Fault("POST", r"/Users\?$", 504, after_serving=True, delay=5.0)),
    "group create": ("POST /Groups", 2, Fault("POST", r"/Groups\?$", 504, after_serving=True, delay=5.0)),
    "membership patch": ("PATCH /Groups/{id}", 1, Fault("PATCH", r"/Groups/", 504, after_serving=True, delay=5.0)),
}


@pytest.mark.parametrize("gap", list(GAPS))
def test_killed_after_atlassian_applied_a_write_but_before_it_was_recorded(gap, kill_setup, children, tmp_path, sync):
    sandbox, config, settings, home, expected = kill_setup()
    counter, after, fault = GAPS[gap]
    fault = copy.deepcopy(fault)
    sandbox.scim.latency = LATENCY
    child = Child(sandbox, config, home, tmp_path / "killed.log")
    children.append(child)
    # Arm the fault once the stage is under way, then kill the child while the server holds the applied write's answer.
    deadline = time.monotonic() + 120
    while sandbox.scim.requests[counter] < after:
        assert child.process.poll() is None and time.monotonic() < deadline, child.log.read_text()[-3000:]
        time.sleep(POLL)
    sandbox.scim.inject(fault)
    child.kill_when(lambda: fault.times == 0)
    time.sleep(0.5)  # the server applies the request first, then sleeps on its answer
    applied_users = {u["externalId"] for u in sandbox.scim.users()}
    applied_groups = {g["externalId"] for g in sandbox.scim.groups()}
    users, groups = recorded(tmp_path / "state.db")
    if gap == "user create":
        assert applied_users - users, "a user exists in Atlassian that the state store never recorded"
    elif gap == "group create":
        assert applied_groups - groups, "a group exists in Atlassian that the state store never recorded"
    else:
        with sqlite3.connect(tmp_path / "state.db") as connection:
            recorded_members = connection.execute("SELECT count(*) FROM members").fetchone()[0]
        in_atlassian = sum(len(g.get("members") or []) for g in sandbox.scim.groups())
        assert in_atlassian > recorded_members, "memberships applied in Atlassian that the state store never recorded"
    finish(sandbox, settings, sync)
    assert_same_state(atlassian_state(sandbox), expected)


# -- killed during a second run that updates, deactivates, renames and deletes ----------------------------


def changes(tenant) -> None:
    """Between runs: disable some users, retitle others, rename a group, delete one, move members."""
    enabled = enabled_members_in_scope(tenant)
    for uid in enabled[:4]:
        tenant.update_user(uid, accountEnabled=False)
    for uid in enabled[4:30]:
        tenant.update_user(uid, jobTitle="Survivor of SIGKILL")
    groups = sorted(tenant.groups, key=lambda gid: tenant.groups[gid]["displayName"])
    tenant.rename_group(groups[0], tenant.groups[groups[0]]["displayName"] + " (renamed)")
    tenant.delete_group(groups[-1])
    for uid in enabled[30:40]:
        tenant.add_member(groups[1], uid)


SECOND_RUN_KILLS = {
    "updates": lambda s: s.scim.requests["PUT /Users/{id}"] >= 8,
    "rename": lambda s: s.scim.requests["POST /Groups"] >= 1,
    "deletion": lambda s: s.scim.requests["DELETE /Groups/{id}"] >= 1,
}


@pytest.mark.parametrize("point", list(SECOND_RUN_KILLS))
def test_a_killed_second_run_deactivates_nobody_wrongly(point, make_sandbox, sync, tmp_path, children, prefect_server):
    def uninterrupted() -> dict:
        reference = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
        reference_db = f"sqlite:///{tmp_path / 'reference.db'}"
        assert sync(reference.settings(reference_db))[0] == 0
        changes(reference.tenant)
        assert sync(reference.settings(reference_db))[0] == 0
        reference.stop()
        return nontrivial(atlassian_state(reference))

    expected = reference_state("second run", uninterrupted)
    assert sum(1 for u in expected["users"].values() if u[1] is False) == 4

    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    config = write_config(tmp_path / "guardsync.toml", sandbox.config(state))
    home = tmp_path / "prefect-home"
    settings = sandbox.settings(state)
    assert sync(settings)[0] == 0
    changes(sandbox.tenant)
    sandbox.scim.reset_counts()
    sandbox.scim.latency = LATENCY
    child = Child(sandbox, config, home, tmp_path / "killed.log")
    children.append(child)
    child.kill_when(lambda: SECOND_RUN_KILLS[point](sandbox))
    time.sleep(3 * LATENCY)
    finish(sandbox, settings, sync)
    state = atlassian_state(sandbox)
    assert_same_state(state, expected)
    assert sorted(n for n, u in state["users"].items() if u[1] is False) == sorted(n for n, u in expected["users"].items() if u[1] is False)
