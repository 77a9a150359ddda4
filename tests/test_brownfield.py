"""Atlassian as it is on day one: directories that already hold the people, names handed from one
object to another in one round, hand edits and hand deletions, emptied tenants, dry runs.

Every world here starts populated (the SCIM server is filled as Atlassian's own sync, Entra's
gallery app or invitations by hand left it), and each test compares what guardsync wrote with
what the contract says, request by request where it matters.
"""

from __future__ import annotations

import json

import pytest

from guardsync.errors import GuardsyncBlocked
from guardsync.state import StateStore
from tests.test_faults import atlassian_state
from tests.test_flow import expected_upns, group_id, groups_by_name, scim_writes, transitive_users
from tests.test_safety import _delete


def scim_user(upn: str, *, title: str | None = None, active: bool = True, display: str | None = None,
              external_id: str | None = None) -> dict:
    user = {"userName": upn, "emails": [{"value": upn, "type": "work", "primary": True}], "active": active,
            "displayName": display or upn.split("@")[0]}
    if title:
        user["title"] = title
    if external_id:
        user["externalId"] = external_id
    return user


def entra_by_upn(tenant) -> dict[str, str]:
    return {u["userPrincipalName"]: uid for uid, u in tenant.users.items()}


def disabled_in_scope(tenant) -> list[str]:
    """UPNs of disabled members on the allowed domains (a sync never creates them)."""
    return sorted(u["userPrincipalName"] for u in tenant.users.values()
                  if not u["accountEnabled"] and "#EXT#" not in u["userPrincipalName"]
                  and u["userPrincipalName"].split("@")[1] in ("contoso.com", "fabrikam.com"))


class PopulatedWorld:
    """A directory that already holds people: accounts in other letter case, with stale titles,
    inactive ones, active accounts of users disabled in Entra, a group of the same name as an Entra
    group, and a foreign user and group that are no one's in Entra."""

    def __init__(self, sandbox):
        tenant = sandbox.tenant
        self.in_scope = sorted(expected_upns(tenant))
        self.exact, self.other_case = self.in_scope[:20], self.in_scope[20:25]
        self.inactive = self.in_scope[25:27]
        self.disabled = disabled_in_scope(tenant)
        self.stale = set(self.exact[:5])
        users = [scim_user(upn, title="Stale Title" if upn in self.stale else tenant.users[entra_by_upn(tenant)[upn]]["jobTitle"],
                           display=tenant.users[entra_by_upn(tenant)[upn]]["displayName"])
                 for upn in self.exact]
        users += [scim_user(upn.upper()) for upn in self.other_case]
        users += [scim_user(upn, active=False) for upn in self.inactive]
        users += [scim_user(upn) for upn in self.disabled]
        users += [scim_user("contractor@contoso.com", display="Contractor, not in Entra")]
        pilot = group_id(tenant, "Pilot")
        pilot_upns = {tenant.users[u]["userPrincipalName"] for u in transitive_users(tenant, pilot)} & set(self.in_scope)
        self.pilot_inside = sorted(pilot_upns & set(self.exact))[:2]
        self.pilot_outsider = next(upn for upn in self.exact if upn not in pilot_upns)
        ids = sandbox.scim.provision(users, {
            "PILOT": self.pilot_inside + [self.pilot_outsider, "contractor@contoso.com"],
            "Hand-made": ["contractor@contoso.com"],
        })
        self.foreign_user_id = ids["contractor@contoso.com"]
        self.foreign_user = sandbox.scim.get_user(self.foreign_user_id)
        self.foreign_group = next(g for g in sandbox.scim.groups() if g["displayName"] == "Hand-made")
        self.pilot_members = pilot_upns


def test_first_run_against_a_populated_directory_adopts_deactivates_and_its_dry_run_is_the_plan(sandbox, state_url, sync, tmp_path):
    world = PopulatedWorld(sandbox)
    settings = sandbox.settings(state_url, max_deactivations=5)
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    assert scim_writes(sandbox) == 0
    sandbox.scim.reset_counts()

    status, summary = sync(settings)
    assert status == 0, summary
    adopted = len(world.exact) + len(world.other_case) + len(world.inactive) + len(world.disabled)
    assert summary.counts["users_adopted"] == adopted
    assert summary.counts["users_deactivated"] == len(world.disabled) == 3
    assert summary.counts["users_reactivated"] == len(world.inactive)
    assert summary.counts["users_created"] == len(world.in_scope) - len(world.exact) - len(world.other_case) - len(world.inactive)
    assert summary.counts["groups_adopted"] == 1
    assert summary.excluded["disabled_never_synced"] == 0  # they have accounts: deactivated, not ignored
    # The preview is the plan: the dry run counted exactly what the sync then did.
    assert {k: v for k, v in preview.counts.items() if v} == {k: v for k, v in summary.counts.items() if v}

    # No create that Atlassian refuses, no lookup at write time: POSTs are the creates, PUTs the adoptions that differ.
    assert sandbox.scim.answered(409) == 0
    assert sandbox.scim.requests["POST /Users"] == summary.counts["users_created"]
    assert sandbox.scim.requests["PUT /Users/{id}"] == adopted  # every adopted account lacked the externalId
    assert sandbox.scim.requests["GET /Users"] == 1  # the observation: 31 accounts, one page of 100
    assert sandbox.scim.requests["GET /Groups"] == 1
    assert sandbox.scim.total("GET") == 2  # and no lookup by filter

    state = atlassian_state(sandbox)
    by_upn = entra_by_upn(sandbox.tenant)
    users = state["users"]
    for upn in world.in_scope:
        external_id, active, _display, title, *_ = users[upn]  # spelled as Entra spells it, other-case ones included
        assert (external_id, active) == (by_upn[upn], True), upn
        assert (title or None) == sandbox.tenant.users[by_upn[upn]]["jobTitle"], upn  # stale titles corrected
    for upn in world.disabled:
        assert users[upn][:2] == (by_upn[upn], False), upn  # the leaver's account is deactivated
    assert len(users) == len(world.in_scope) + len(world.disabled) + 1  # nothing duplicated
    # The adopted group: its members are exactly the Pilot's, the outsider and the contractor taken out.
    pilot = next(g for g in sandbox.scim.groups() if g["displayName"] == "PILOT")
    assert pilot["externalId"] == group_id(sandbox.tenant, "Pilot")
    assert state["groups"]["PILOT"][1] == frozenset(world.pilot_members)
    # Objects no Entra object matches are untouched, byte for byte.
    assert sandbox.scim.get_user(world.foreign_user_id) == world.foreign_user
    assert next(g for g in sandbox.scim.groups() if g["id"] == world.foreign_group["id"]) == world.foreign_group

    sandbox.scim.reset_counts()
    assert sync(settings)[0] == 0 and scim_writes(sandbox) == 0
    status, summary = sync(settings, full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary.drift


def test_a_first_run_counts_the_accounts_it_adopts_in_the_deactivation_guard(sandbox, state_url, sync):
    tenant = sandbox.tenant
    active = sorted(expected_upns(tenant))[:17]
    disabled = disabled_in_scope(tenant)
    sandbox.scim.provision([scim_user(upn) for upn in active + disabled])  # 20 active accounts, 3 of leavers
    status, error = sync(sandbox.settings(state_url))  # 10% of 20: 2 deactivations allowed
    assert status == 3 and isinstance(error, GuardsyncBlocked), error
    assert "max_deactivations" in str(error) and "20 active users managed" in str(error)
    assert scim_writes(sandbox) == 0
    assert not StateStore(state_url).load().users
    status, summary = sync(sandbox.settings(state_url, max_deactivations="15%"))
    assert status == 0 and summary.counts["users_deactivated"] == 3, summary


def test_a_group_name_handed_over_in_one_round(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    name = next(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    old = group_id(tenant, name)
    old_members = groups_by_name(sandbox)[name]
    tenant.rename_group(old, f"{name} EMEA")
    new = tenant.add_group(name)
    newcomers = sorted(expected_upns(tenant))[:3]
    by_upn = entra_by_upn(tenant)
    for upn in newcomers:
        tenant.add_member(new, by_upn[upn])
    sandbox.scim.reset_counts()

    status, summary = sync(sandbox.settings(state_url))  # a delta round
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 0
    groups = {g["displayName"]: g for g in sandbox.scim.groups()}
    assert groups[name]["externalId"] == new and groups[f"{name} EMEA"]["externalId"] == old
    after = groups_by_name(sandbox)
    assert after[f"{name} EMEA"] == old_members and after[name] == set(newcomers)
    assert summary.counts["groups_renamed"] == 1 and summary.counts["groups_created"] == 1
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary.drift


def test_a_deleted_group_name_is_free_for_a_new_group_in_the_same_round(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url, max_deactivations=10))[0] == 0
    name = "Pilot Champions"
    tenant.delete_group(group_id(tenant, name))
    new = tenant.add_group(name)
    tenant.add_member(new, entra_by_upn(tenant)[sorted(expected_upns(tenant))[0]])
    status, summary = sync(sandbox.settings(state_url, max_deactivations=10))
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 0
    assert next(g for g in sandbox.scim.groups() if g["displayName"] == name)["externalId"] == new


@pytest.mark.parametrize("first_user_goes", ["deleted", "renamed"])
def test_an_identifier_handed_from_one_entra_user_to_another(sandbox, state_url, sync, first_user_goes):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    by_upn = entra_by_upn(tenant)
    upn = sorted(expected_upns(tenant))[3]
    first = by_upn[upn]
    account = next(u for u in sandbox.scim.users() if u["userName"] == upn)
    if first_user_goes == "deleted":
        tenant.delete_user(first)
    else:
        tenant.update_user(first, userPrincipalName=f"former.{upn}")
    second = tenant.add_user(userPrincipalName=upn, givenName="New", surname="Hire", displayName="New Hire",
                             jobTitle="Analyst")
    pilot = group_id(tenant, "Pilot")
    tenant.add_member(pilot, second)
    sandbox.scim.reset_counts()

    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 0
    held = sandbox.scim.get_user(account["id"])
    assert (held["externalId"], held["active"], held["displayName"]) == (second, True, "New Hire")  # the account went on
    assert any(upn in line and first in line and second in line for line in summary.handovers), summary.handovers
    recorded = StateStore(state_url).load()
    assert first not in recorded.users or recorded.users[first].scim_id != account["id"]
    assert recorded.users[second].scim_id == account["id"]
    scim_ids = [u.scim_id for u in recorded.users.values()]
    assert len(scim_ids) == len(set(scim_ids))  # two Entra ids never share one account
    pilot_name = tenant.groups[pilot]["displayName"]
    assert upn in groups_by_name(sandbox)[pilot_name]
    if first_user_goes == "renamed":  # the renamed user carries on with an account of its new name
        assert atlassian_state(sandbox)["users"][f"former.{upn}"][:2] == (first, True)
    assert summary.counts.get("users_deactivated", 0) == 0
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary.drift


@pytest.mark.parametrize("leaves", ["disabled", "deleted"])
@pytest.mark.parametrize("read", ["delta", "full"])
def test_an_account_deleted_by_hand_whose_user_then_leaves_is_gone_never_created_again(sandbox, state_url, sync, leaves, read):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    upn = sorted(expected_upns(tenant))[5]
    user = entra_by_upn(tenant)[upn]
    account = next(u for u in sandbox.scim.users() if u["userName"] == upn)
    _delete(sandbox, "Users", account["id"])
    if leaves == "disabled":
        tenant.update_user(user, accountEnabled=False)
    else:
        tenant.delete_user(user)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=read == "full")
    assert status == 0, summary
    assert sandbox.scim.requests["POST /Users"] == 0  # no account for a leaver
    assert upn not in {u["userName"] for u in sandbox.scim.users()}
    assert not any(upn in members for members in groups_by_name(sandbox).values())
    assert user not in StateStore(state_url).load().users  # recorded as gone
    sandbox.scim.reset_counts()
    for full in (False, True):
        status, summary = sync(sandbox.settings(state_url), full=full)
        assert status == 0 and scim_writes(sandbox) == 0, (full, summary)


@pytest.mark.parametrize("read", ["delta", "full"])
def test_an_account_deleted_by_hand_whose_user_stays_is_created_again_in_its_groups(sandbox, state_url, sync, read):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    pilot = tenant.groups[group_id(tenant, "Pilot")]["displayName"]
    upn = sorted(groups_by_name(sandbox)[pilot])[0]
    account = next(u for u in sandbox.scim.users() if u["userName"] == upn)
    _delete(sandbox, "Users", account["id"])
    sandbox.scim.reset_counts()
    if read == "delta":
        tenant.update_user(entra_by_upn(tenant)[upn], jobTitle="Moved On Up")  # the delta round sees a change: PUT, 404
    status, summary = sync(sandbox.settings(state_url), full=read == "full")
    assert status == 0, summary
    assert sandbox.scim.requests["POST /Users"] == 1
    assert upn in groups_by_name(sandbox)[pilot]
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary.drift


def test_a_tenant_emptied_after_a_synced_run_is_blocked_as_empty(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    before = atlassian_state(sandbox)
    for group in list(tenant.groups):
        tenant.delete_group(group)
    for user in list(tenant.users):
        tenant.delete_user(user)
    sandbox.scim.reset_counts()
    for full in (False, True):
        status, error = sync(sandbox.settings(state_url, max_deactivations="100%"), full=full)
        assert status == 3 and isinstance(error, GuardsyncBlocked) and "empty_scope" in str(error), error
        assert scim_writes(sandbox) == 0
    assert atlassian_state(sandbox) == before


def test_an_empty_tenant_on_an_empty_directory_syncs_nothing(make_sandbox, state_url, sync):
    sandbox = make_sandbox()
    for group in list(sandbox.tenant.groups):
        sandbox.tenant.delete_group(group)
    for user in list(sandbox.tenant.users):
        sandbox.tenant.delete_user(user)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert not any(summary.counts.values()) and scim_writes(sandbox) == 0


def test_a_dry_run_writes_no_state_anywhere(sandbox, tmp_path, sync):
    path = tmp_path / "never.db"
    status, summary = sync(sandbox.settings(f"sqlite:///{path}"), dry_run=True)
    assert status == 0 and summary.counts["users_created"] > 0
    assert not path.exists() and not list(tmp_path.glob("never.db*"))
    # A store that exists is only read: its rows stay exactly as they were.
    assert sync(sandbox.settings(f"sqlite:///{path}"))[0] == 0
    sandbox.tenant.update_user(next(iter(sandbox.tenant.users)), jobTitle="Changed")
    rows = _dump_sqlite(path)
    status, _ = sync(sandbox.settings(f"sqlite:///{path}"), dry_run=True)
    assert status == 0 and _dump_sqlite(path) == rows


def test_a_dry_run_on_an_empty_postgresql_database_creates_no_table(sandbox, sync, fresh_postgres):
    status, _ = sync(sandbox.settings(fresh_postgres), dry_run=True)
    assert status == 0
    from sqlalchemy import create_engine, inspect

    engine = create_engine(fresh_postgres)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def _dump_sqlite(path) -> str:
    import sqlite3

    with sqlite3.connect(path) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return json.dumps({t: [list(map(str, r)) for r in conn.execute(f'SELECT * FROM "{t}" ORDER BY 1')] for t in tables})
