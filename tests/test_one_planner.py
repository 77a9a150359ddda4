"""Issue 19, one planner for every path: a write that meets 404 or 409, and a delta run that needs one
fact, read those objects and plan them with the planner the observing runs use.

Each test is a history that failed before (named by its item in issue 19), run through the real flow
against the sandbox; each ends with runs that must write nothing (converged). Request counts are
checked where they are cheap to check: the extra reads happen only where a write met 404/409 or a
delta run needed a fact.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import requests

import guardsync.load
import guardsync.state
from guardsync.sandbox.http import Fault
from guardsync.state import DirectoryBusy, StateStore
from tests.test_brownfield import entra_by_upn, scim_user
from tests.test_brownfield_review import _frozen_original_and_its_group
from tests.test_faults import atlassian_state
from tests.test_flow import expected_upns, group_id, groups_by_name, scim_writes, transitive_users
from tests.test_safety import _delete


def _put_by_hand(sandbox, scim_id: str, resource: dict) -> None:
    """An admin's edit in Atlassian (through the API, as any other client would)."""
    answer = requests.put(f"{sandbox.scim.scim_url}/Users/{scim_id}", json=resource,
                          headers={"Authorization": f"Bearer {sandbox.api_key}"}, verify=str(sandbox.ca.ca_file),
                          timeout=10)
    assert answer.status_code == 200, answer.text


def _account(sandbox, user_name: str) -> dict:
    return next(u for u in sandbox.scim.users() if u["userName"].casefold() == user_name.casefold())


def _reads(sandbox) -> int:
    return sandbox.scim.total("GET")


def _converged(sandbox, settings, sync) -> None:
    """A delta run and a full read after it write nothing."""
    for full in (False, True):
        sandbox.scim.reset_counts()
        status, summary = sync(settings, full=full)
        assert status == 0, (full, summary)
        assert scim_writes(sandbox) == 0, (full, summary.counts, summary.drift)


def _members_wanted(tenant, gid) -> set[str]:
    in_scope = expected_upns(tenant)
    return {tenant.users[u]["userPrincipalName"] for u in transitive_users(tenant, gid)} & in_scope


# -- item 1 ----------------------------------------------------------------------------------------


def test_1_a_leaver_whose_email_was_edited_by_hand_is_deactivated(sandbox, state_url, sync):
    """The account's primary email was edited by hand (it differs from userName), then its user leaves.
    A full read observes `userName <email>`; the deactivation must write the account's own userName,
    never that encoded form (Atlassian refuses it, and every later run failed)."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    upn = sorted(expected_upns(tenant))[4]
    account = _account(sandbox, upn)
    edited = {key: value for key, value in account.items() if key not in ("id", "meta")}
    edited["emails"] = [{"value": f"other.{upn}", "type": "work", "primary": True}]
    _put_by_hand(sandbox, account["id"], edited)
    tenant.delete_user(entra_by_upn(tenant)[upn])  # left: its account is deactivated from what Atlassian holds
    sandbox.scim.reset_counts()
    status, summary = sync(settings, full=True)
    assert status == 0, summary
    held = sandbox.scim.get_user(account["id"])
    assert (held["userName"], held["active"]) == (upn, False)
    assert " <" not in held["userName"]
    _converged(sandbox, settings, sync)


# -- item 6 ----------------------------------------------------------------------------------------


def _group_deleted_by_hand_then_a_member_added(sandbox, state_url, sync):
    """After a first sync: a managed group deleted by hand in Atlassian, then a member added to it in Entra.
    Returns the settings, the group's name and Entra id, and the newcomer's UPN."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    name = next(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    gid = group_id(tenant, name)
    _delete(sandbox, "Groups", next(g["id"] for g in sandbox.scim.groups() if g["displayName"] == name))
    by_upn = entra_by_upn(tenant)
    newcomer = next(upn for upn in sorted(expected_upns(tenant)) if by_upn[upn] not in transitive_users(tenant, gid))
    tenant.add_member(gid, by_upn[newcomer])
    sandbox.scim.reset_counts()
    return settings, name, gid, newcomer


def test_6_a_managed_group_deleted_by_hand_then_a_membership_change_on_a_delta_run(sandbox, state_url, sync):
    """The group's PATCH meets 404: the run reads the group's name, plans it as a full read would (a group
    of the synced set that Atlassian does not hold is created, with its members) and applies that."""
    settings, name, gid, newcomer = _group_deleted_by_hand_then_a_member_added(sandbox, state_url, sync)
    status, summary = sync(settings)
    assert status == 0, summary
    assert sandbox.scim.answered(404) == 1
    assert _reads(sandbox) <= 1  # the group looked up by name, once
    group = next(g for g in sandbox.scim.groups() if g["displayName"] == name)
    assert group["externalId"] == gid
    assert groups_by_name(sandbox)[name] == _members_wanted(sandbox.tenant, gid)
    assert newcomer in groups_by_name(sandbox)[name]
    _converged(sandbox, settings, sync)


def test_6_the_dry_run_of_that_delta_run_shows_the_group_re_created(sandbox, state_url, sync):
    """The dry run of the same round reads what the sync's writes meet (the group is gone: a GET answers 404),
    plans it as the sync's loader will, and its counts are the sync's; it writes nothing."""
    settings, name, gid, newcomer = _group_deleted_by_hand_then_a_member_added(sandbox, state_url, sync)
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    assert scim_writes(sandbox) == 0
    assert preview.counts["groups_created"] == 1
    assert preview.counts["members_added"] == len(_members_wanted(sandbox.tenant, gid))  # the re-created group's
    assert sandbox.scim.answered(404) == 1 and _reads(sandbox) <= 2  # the group by id (404), then by name
    status, summary = sync(settings)
    assert status == 0, summary
    assert {k: v for k, v in summary.counts.items() if v} == {k: v for k, v in preview.counts.items() if v}
    _converged(sandbox, settings, sync)


def test_an_observing_run_records_what_it_saw_where_it_writes_nothing(sandbox, state_url, sync):
    """A member Entra removed that was also taken out by hand in Atlassian (or by a killed run's PATCH that
    landed unrecorded): the full read finds Atlassian right and writes nothing, and records what it saw, so a
    delta run that adds the member back in Entra adds it in Atlassian (before: the record still held it)."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    by_upn = entra_by_upn(tenant)
    synced = groups_by_name(sandbox)

    def direct_only(gid: str, uid: str) -> bool:  # a direct member, not also reached through a nested group
        nested = [m for m in tenant.members.get(gid, ()) if m in tenant.groups]
        return uid in tenant.members.get(gid, ()) and not any(uid in transitive_users(tenant, n) for n in nested)

    name, gid, upn = next((g["displayName"], g["id"], upn) for g in tenant.groups.values() if g["displayName"] in synced
                          for upn in sorted(synced[g["displayName"]]) if direct_only(g["id"], by_upn[upn]))
    tenant.remove_member(gid, by_upn[upn])
    assert by_upn[upn] not in transitive_users(tenant, gid), "a member through nesting too: pick another"
    group = next(g for g in sandbox.scim.groups() if g["displayName"] == name)
    account = _account(sandbox, upn)
    answer = requests.patch(f"{sandbox.scim.scim_url}/Groups/{group['id']}", headers={"Authorization": f"Bearer {sandbox.api_key}"},
                            json={"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                  "Operations": [{"op": "remove", "path": f'members[value eq "{account["id"]}"]'}]},
                            verify=str(sandbox.ca.ca_file), timeout=10)
    assert answer.status_code in (200, 204), answer.text
    sandbox.scim.reset_counts()
    status, summary = sync(settings, full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary  # Atlassian is as Entra wants it
    tenant.add_member(gid, by_upn[upn])
    status, summary = sync(settings)
    assert status == 0, summary
    assert upn in groups_by_name(sandbox)[name]
    _converged(sandbox, settings, sync)


# -- item 7 ----------------------------------------------------------------------------------------


def test_7_a_disabled_user_entering_scope_whose_active_account_exists_is_deactivated_on_a_delta_run(
        sandbox, state_url, sync):
    """A full read adopts and deactivates such an account; a delta run must too: it looks the disabled
    newcomer up (one fact), once, and plans it as the full read does."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    upn = "dora.departed@contoso.com"
    held = sandbox.scim.add_user(scim_user(upn, display="Dora Departed"))
    dora = tenant.add_user(userPrincipalName=upn, mail=upn, givenName="Dora", surname="Departed",
                           displayName="Dora Departed", accountEnabled=False)
    sandbox.scim.reset_counts()
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    assert preview.counts.get("users_deactivated") == 1 and preview.counts.get("users_adopted") == 1
    sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert _reads(sandbox) <= 2  # userName eq (and externalId eq when that finds nothing): that user only
    account = sandbox.scim.get_user(held["id"])
    assert (account["active"], account.get("externalId")) == (False, dora)
    assert {k: v for k, v in summary.counts.items() if v} == {k: v for k, v in preview.counts.items() if v}
    # The fact is kept: a later delta run with a change in Entra does not look the disabled users up again.
    someone = entra_by_upn(tenant)[sorted(expected_upns(tenant))[2]]
    tenant.update_user(someone, jobTitle="Looked Up Once")
    sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert _reads(sandbox) == 0 and scim_writes(sandbox) == 1
    _converged(sandbox, settings, sync)


# -- item 8 ----------------------------------------------------------------------------------------


def renamed_onto_a_hand_made_account(sandbox, state_url, sync):
    """After a first sync: a Pilot member renamed in Entra to the userName of an account made by hand.
    Returns the settings, the Pilot group's name, the old UPN, the user's Entra id, the new UPN, the account."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    pilot = tenant.groups[group_id(tenant, "Pilot")]["displayName"]
    upn = sorted(groups_by_name(sandbox)[pilot])[1]
    user = entra_by_upn(tenant)[upn]
    new_upn = f"renamed.{upn}"
    made = sandbox.scim.add_user(scim_user(new_upn, display="Made by hand"))
    tenant.update_user(user, userPrincipalName=new_upn, mail=new_upn)
    return settings, pilot, upn, user, new_upn, made


@pytest.mark.parametrize("read", ["delta", "full"])
def test_8_a_managed_user_renamed_to_the_identifier_of_an_unmanaged_account_adopts_it(sandbox, state_url, sync, read):
    """DESIGN.md: accounts that already exist with the same userName are taken over, never duplicated, and
    Atlassian keys accounts by email; a renamed user "gets the new userName": the account that holds it.
    So the renamed user adopts that account (as on a first run) and its old account, whose identifier is
    nobody's now, is deactivated and released, as in a hand-over. Before: 409 on every run."""
    settings, pilot, upn, user, new_upn, made = renamed_onto_a_hand_made_account(sandbox, state_url, sync)
    old = _account(sandbox, upn)
    sandbox.scim.reset_counts()
    status, summary = sync(settings, full=read == "full")
    assert status == 0, summary
    if read == "delta":
        assert sandbox.scim.answered(409) == 1 and _reads(sandbox) <= 2
    else:
        assert sandbox.scim.answered(409) == 0
    adopted = sandbox.scim.get_user(made["id"])
    assert (adopted["externalId"], adopted["active"], adopted["userName"]) == (user, True, new_upn)
    released = sandbox.scim.get_user(old["id"])
    assert released["active"] is False and not released.get("externalId")
    assert new_upn in groups_by_name(sandbox)[pilot] and upn not in groups_by_name(sandbox)[pilot]
    assert StateStore(state_url).load().users[user].scim_id == made["id"]
    _converged(sandbox, settings, sync)


# -- item 9 ----------------------------------------------------------------------------------------


def test_9_a_hand_over_whose_old_account_was_deleted_by_hand_joins_the_leavers_group(sandbox, state_url, sync):
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    pilot = group_id(tenant, "Pilot")
    pilot_name = tenant.groups[pilot]["displayName"]
    upn = sorted(groups_by_name(sandbox)[pilot_name])[0]
    first = entra_by_upn(tenant)[upn]
    _delete(sandbox, "Users", _account(sandbox, upn)["id"])
    tenant.delete_user(first)
    second = tenant.add_user(userPrincipalName=upn, mail=upn, givenName="New", surname="Hire", displayName="New Hire")
    tenant.add_member(pilot, second)
    sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert _reads(sandbox) <= 2
    assert _account(sandbox, upn)["externalId"] == second
    assert upn in groups_by_name(sandbox)[pilot_name]
    recorded = StateStore(state_url).load()
    assert first not in recorded.users and second in recorded.members[pilot]
    _converged(sandbox, settings, sync)


# -- item 10 ---------------------------------------------------------------------------------------


def test_10_widening_a_pilot_adopts_a_group_on_409_and_keeps_a_quarantined_users_membership(sandbox, state_url, sync):
    """Quarantined users are frozen: their memberships stay as they are. A delta run (a wider pilot) creates a
    group whose name a hand-made group holds: 409, read, adopted as a full read adopts it."""
    tenant = sandbox.tenant
    uid, upn, gid, name = _frozen_original_and_its_group(tenant)
    tenant.add_member(group_id(tenant, "Pilot"), uid)  # its case twin is in the Pilot: both in scope, both frozen
    stranger = "stranger@contoso.com"
    ids = sandbox.scim.provision([scim_user(upn), scim_user(stranger)], {name: [upn, stranger]})
    assert sync(sandbox.settings(state_url, groups=["Pilot"]))[0] == 0
    wider = sandbox.settings(state_url, groups=["Pilot", name])
    sandbox.scim.reset_counts()
    status, summary = sync(wider)
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 1
    group = next(g for g in sandbox.scim.groups() if g["displayName"] == name)
    members = {m["value"] for m in group.get("members") or []}
    assert group["externalId"] == gid
    assert ids[upn] in members  # frozen: kept (an account guardsync does not manage, read to know it is theirs)
    assert ids[stranger] not in members  # an adopted group's members become exactly the synced ones
    assert groups_by_name(sandbox)[name] - {upn} == _members_wanted(tenant, gid)
    _converged(sandbox, wider, sync)


# -- a full read renaming onto a hand-made group's name --------------------------------------------


def test_a_delta_run_that_renames_a_group_to_the_name_of_a_hand_made_group_adopts_it(sandbox, state_url, sync):
    """The delta twin of test_brownfield_review's full read: the rename's create meets 409, the group is
    read, and the plan (the same one) adopts it as the renamed group's, with its members exact."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    name = next(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    gid = group_id(tenant, name)
    ids = sandbox.scim.provision([scim_user("contractor@contoso.com")], {"Hand Made Team": ["contractor@contoso.com"]})
    tenant.rename_group(gid, "Hand Made Team")
    sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 1
    groups = groups_by_name(sandbox)
    assert name not in groups and groups["Hand Made Team"] == _members_wanted(tenant, gid)
    held = next(g for g in sandbox.scim.groups() if g["displayName"] == "Hand Made Team")
    assert held["externalId"] == gid and ids["contractor@contoso.com"] not in {m["value"] for m in held["members"]}
    _converged(sandbox, settings, sync)


# -- item 13 ---------------------------------------------------------------------------------------


def test_13_a_run_whose_lease_was_taken_over_stops_before_its_next_write(sandbox, state_url, sync, monkeypatch):
    """The run's lease ran out while a write hung (the heartbeat could not help: say the worker froze), and
    another run took the directory. The first run must not write again: it stops, and says why."""
    monkeypatch.setattr(guardsync.load, "RECORD_EVERY", 1)  # every write is a batch of its own
    settings = sandbox.settings(state_url, write_concurrency=1)
    # The 6th create is applied, then its answer hangs (and comes back 503: the client finds it applied).
    sandbox.scim.inject(Fault("POST", r"/Users", delay=2.0, skip=5, after_serving=True))
    thief = StateStore(state_url)

    def take_over() -> None:
        deadline = time.monotonic() + 60
        while sandbox.scim.total("POST") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        with thief.engine.begin() as conn:  # the lease ran out...
            conn.execute(guardsync.state.locks.update().values(expires_at=guardsync.state.now() - timedelta(minutes=1)))
        thief.acquire_lock("the-next-run")  # ...and the next run took the directory
        stolen.set()

    stolen = threading.Event()
    taker = threading.Thread(target=take_over)
    taker.start()
    status, error = sync(settings)
    taker.join()
    assert stolen.is_set()
    assert status == 1 and isinstance(error, DirectoryBusy), error
    assert "lost the directory lock" in str(error)
    assert sandbox.scim.total("POST") == 6  # the write in flight when the lease was taken, and none after
    thief.dispose()


def test_13_the_stale_retry_order_does_not_trust_a_workers_clock(tmp_path, monkeypatch):
    """Run A starts; run B starts later on a worker whose clock is an hour behind. A retry of A must still
    see that B ran after it (the order is the database's, not the workers')."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    assert store.start_run("run-a", "sync") is None
    store.finish_run("run-a", "failed")
    real_now = guardsync.state.now
    monkeypatch.setattr(guardsync.state, "now", lambda: real_now() - timedelta(hours=1))
    assert store.start_run("run-b", "sync") is None
    store.finish_run("run-b", "completed")
    monkeypatch.setattr(guardsync.state, "now", real_now)
    later = store.start_run("run-a", "sync")
    assert later is not None and later["run_id"] == "run-b"
    store.dispose()


def test_13_a_lease_is_timed_by_the_database_not_by_a_workers_clock(fresh_postgres, monkeypatch):
    """A holder whose clock is an hour behind took the lock for ten minutes: a contender must not see that
    lease as run out."""
    holder, contender = StateStore(fresh_postgres), StateStore(fresh_postgres)
    real_now = guardsync.state.now
    monkeypatch.setattr(guardsync.state, "now", lambda: real_now() - timedelta(hours=1))
    holder.acquire_lock("holder", timedelta(minutes=10))
    monkeypatch.setattr(guardsync.state, "now", real_now)
    try:
        with pytest.raises(DirectoryBusy, match="holder"):
            contender.acquire_lock("contender", timedelta(minutes=10))
    finally:
        holder.dispose()
        contender.dispose()
