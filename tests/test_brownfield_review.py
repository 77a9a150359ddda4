"""Review of issue 12 (plan against Atlassian as it is): worlds the first tests did not try.

Each test states the world, then what DESIGN.md ("Semantics", "Atlassian as it is") says
the end state is, checked against the real sandbox.
"""

from __future__ import annotations

from guardsync.sandbox.http import Fault
from guardsync.state import StateStore
from tests.test_brownfield import disabled_in_scope, entra_by_upn, scim_user
from tests.test_faults import atlassian_state
from tests.test_flow import expected_upns, group_id, groups_by_name, scim_writes, transitive_users
from tests.test_safety import _delete


def nonzero(counts: dict) -> dict:
    return {key: value for key, value in counts.items() if value}


def test_a_full_read_dry_run_counts_the_gone_leaver_the_sync_reports(sandbox, state_url, sync):
    """Dry run: "its counts are the counts the sync then reports" - a leaver deleted by hand included."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    upn = sorted(expected_upns(tenant))[5]
    account = next(u for u in sandbox.scim.users() if u["userName"] == upn)
    _delete(sandbox, "Users", account["id"])
    tenant.update_user(entra_by_upn(tenant)[upn], accountEnabled=False)
    status, preview = sync(sandbox.settings(state_url), full=True, dry_run=True)
    assert status == 0, preview
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0, summary
    assert summary.counts.get("users_gone") == 1
    assert nonzero(preview.counts) == nonzero(summary.counts)


def _frozen_original_and_its_group(tenant):
    """A quarantined user (the original of a case twin) and a synced group it is a direct member of."""
    twins = {u["userPrincipalName"] for u in tenant.users.values()
             if u["userPrincipalName"] != u["userPrincipalName"].lower() and "#EXT#" not in u["userPrincipalName"]}
    lowered = {t.casefold() for t in twins}
    for uid, user in tenant.users.items():
        if user["userPrincipalName"] in twins or user["userPrincipalName"].casefold() not in lowered:
            continue
        for gid, group in tenant.groups.items():
            if uid in transitive_users(tenant, gid) and group["displayName"] not in ("Pilot", "Pilot Champions"):
                return uid, user["userPrincipalName"], gid, group["displayName"]
    raise AssertionError("the sandbox tenant has no quarantined user in a group")


def test_a_frozen_users_account_in_an_adopted_group_stays_in_it(sandbox, state_url, sync):
    """Quarantined users are frozen: "their group memberships stay as they were (none added, none
    removed) this run". Atlassian already holds the frozen user's account, in a group of the same
    name as the Entra group it belongs to; the first run adopts the group."""
    tenant = sandbox.tenant
    _uid, upn, _gid, name = _frozen_original_and_its_group(tenant)
    ids = sandbox.scim.provision([scim_user(upn)], {name: [upn]})
    account = sandbox.scim.get_user(ids[upn])
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert summary.counts["groups_adopted"] == 1
    assert sandbox.scim.get_user(ids[upn]) == account  # frozen: not adopted, not updated
    group = next(g for g in sandbox.scim.groups() if g["displayName"] == name)
    assert ids[upn] in {m["value"] for m in group.get("members") or []}  # and not taken out of its group


def test_a_managed_user_takes_the_identifier_of_a_managed_user_deleted_in_the_same_round(sandbox, state_url, sync):
    """User A is renamed to the identifier of user B, who is deleted in Entra in the same round.
    "renames, deletions and deactivations that free a name go before the creations that need it";
    Atlassian keys accounts by email, and a deactivated account keeps its userName. The run must end
    with A holding an account of its new identifier, one account per Entra id, and converge."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    by_upn = entra_by_upn(tenant)
    upn_a, upn_b = sorted(expected_upns(tenant))[6:8]
    a, b = by_upn[upn_a], by_upn[upn_b]
    tenant.delete_user(b)
    tenant.update_user(a, userPrincipalName=upn_b, mail=upn_b)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary.failures
    users = atlassian_state(sandbox)["users"]
    assert users[upn_b][:2] == (a, True)
    assert users[upn_a][1] is False  # its old account, of the identifier nobody holds now, is deactivated
    recorded = StateStore(state_url).load()
    assert recorded.users[a].scim_id == next(u["id"] for u in sandbox.scim.users() if u["userName"] == upn_b)
    scim_ids = [u.scim_id for u in recorded.users.values()]
    assert len(scim_ids) == len(set(scim_ids))
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and scim_writes(sandbox) == 0, summary


def test_users_renamed_in_a_chain_in_one_round(sandbox, state_url, sync):
    """x -> y while y -> z (both managed): the one giving y up goes first, no 409."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    by_upn = entra_by_upn(tenant)
    x, y = sorted(expected_upns(tenant))[8:10]
    z = f"zed.{y}"
    tenant.update_user(by_upn[y], userPrincipalName=z, mail=z)
    tenant.update_user(by_upn[x], userPrincipalName=y, mail=y)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 0
    users = atlassian_state(sandbox)["users"]
    assert users[y][0] == by_upn[x] and users[z][0] == by_upn[y] and x not in users
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url), full=True)[0] == 0 and scim_writes(sandbox) == 0


def test_groups_renamed_in_a_chain_in_one_round(sandbox, state_url, sync):
    """A -> B while B -> C: two groups, same members each, no 409, converged."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    names = sorted(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    a, b = names[:2]
    before = groups_by_name(sandbox)
    ga, gb = group_id(tenant, a), group_id(tenant, b)
    tenant.rename_group(gb, f"{b} C")
    tenant.rename_group(ga, b)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.answered(409) == 0
    after = groups_by_name(sandbox)
    assert after[b] == before[a] and after[f"{b} C"] == before[b] and a not in after
    by_name = {g["displayName"]: g["externalId"] for g in sandbox.scim.groups()}
    assert by_name[b] == ga and by_name[f"{b} C"] == gb
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url), full=True)[0] == 0 and scim_writes(sandbox) == 0


def test_a_hand_over_whose_old_account_was_deleted_by_hand(sandbox, state_url, sync):
    """The identifier passes from a deleted Entra user to a new one, and the old account is already
    gone: the new user gets one account, the old id is unmapped, nothing else is written."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    upn = sorted(expected_upns(tenant))[3]
    first = entra_by_upn(tenant)[upn]
    account = next(u for u in sandbox.scim.users() if u["userName"] == upn)
    _delete(sandbox, "Users", account["id"])
    tenant.delete_user(first)
    second = tenant.add_user(userPrincipalName=upn, givenName="New", surname="Hire", displayName="New Hire")
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert atlassian_state(sandbox)["users"][upn][:2] == (second, True)
    recorded = StateStore(state_url).load()
    assert first not in recorded.users and second in recorded.users
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url), full=True)[0] == 0 and scim_writes(sandbox) == 0


def test_a_first_run_resumed_after_a_failed_load_is_guarded_as_a_first_run(sandbox, state_url, sync):
    """max_deactivations on a first run counts the active accounts it adopts. The first run fails in
    the users stage (a 401 mid-way) after some adoptions were recorded; the re-run must pass the guard
    as the uninterrupted run does ("Resumable: ... ends in the same Atlassian state")."""
    tenant = sandbox.tenant
    active = sorted(expected_upns(tenant))[:17]
    disabled = disabled_in_scope(tenant)
    sandbox.scim.provision([scim_user(upn) for upn in active + disabled])  # 20 active accounts, 3 of leavers
    settings = sandbox.settings(state_url, max_deactivations="15%", write_concurrency=1)
    sandbox.scim.inject(Fault("PUT", r"/Users/", status=401, times=1, skip=5,
                              body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}'))
    status, _ = sync(settings)
    assert status != 0
    assert StateStore(state_url).load().users  # some adoptions were recorded
    status, summary = sync(settings)
    assert status == 0, summary
    for upn in disabled:
        assert atlassian_state(sandbox)["users"][upn][1] is False


def test_a_prefect_retry_of_a_brownfield_first_run_that_failed_in_the_users_load(sandbox, state_url, prefect_server):
    """A 401 mid-way through the adoptions fails load-users; the flow's own retry (same run id, cached
    observe and plan) ends as an uninterrupted run: every account adopted once, leavers deactivated,
    nothing duplicated, and a full read after it writes nothing."""
    from flows.sync_directory import sync_directory
    from tests.test_brownfield import PopulatedWorld

    world = PopulatedWorld(sandbox)
    settings = sandbox.settings(state_url, max_deactivations=5)
    sandbox.scim.inject(Fault("PUT", r"/Users/", status=401, times=1, skip=6,
                              body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}'))
    result = sync_directory.with_options(retries=1, retry_delay_seconds=0)(settings=settings)
    assert result["status"] == "completed", result
    assert sandbox.scim.answered(401) == 1
    state = atlassian_state(sandbox)  # fails on any duplicate
    by_upn = entra_by_upn(sandbox.tenant)
    for upn in world.in_scope:
        assert state["users"][upn][:2] == (by_upn[upn], True), upn
    for upn in world.disabled:
        assert state["users"][upn][:2] == (by_upn[upn], False), upn
    assert sandbox.scim.get_user(world.foreign_user_id) == world.foreign_user
    sandbox.scim.reset_counts()
    sync_directory(settings=settings, full=True)
    assert scim_writes(sandbox) == 0


def test_pilot_mode_on_a_populated_directory_touches_only_the_pilot(sandbox, state_url, sync):
    """sync.groups = ["Pilot"]: accounts of users outside the Pilot, leavers' accounts, and groups of the
    same name as Entra groups that are not synced stay byte-identical; the Pilot's users are adopted."""
    from tests.test_brownfield import PopulatedWorld

    world = PopulatedWorld(sandbox)
    tenant = sandbox.tenant
    pilot_all = {tenant.users[u]["userPrincipalName"].casefold() for u in transitive_users(tenant, group_id(tenant, "Pilot"))}
    outside = [u for u in sandbox.scim.users() if u["userName"].casefold() not in pilot_all]
    assert outside and any(upn.casefold() not in pilot_all for upn in world.disabled)
    other_group = next(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    sandbox.scim.provision([], {other_group: [], "Pilot Champions": []})
    untouched_groups = [g for g in sandbox.scim.groups() if g["displayName"] in (other_group, "Pilot Champions", "Hand-made")]
    settings = sandbox.settings(state_url, groups=["Pilot"])
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    status, summary = sync(settings)
    assert status == 0, summary
    assert nonzero(preview.counts) == nonzero(summary.counts)
    for user in outside:
        assert sandbox.scim.get_user(user["id"]) == user, user["userName"]
    for group in untouched_groups:
        assert sandbox.scim.get_group(group["id"]) == group, group["displayName"]
    assert summary.counts["users_deactivated"] == sum(upn.casefold() in pilot_all for upn in world.disabled)
    pilot = next(g for g in sandbox.scim.groups() if g["displayName"] == "PILOT")
    assert pilot["externalId"] == group_id(tenant, "Pilot")
    sandbox.scim.reset_counts()
    assert sync(settings, full=True)[0] == 0 and scim_writes(sandbox) == 0


def test_a_full_read_that_renames_a_group_to_the_name_of_a_hand_made_group_is_previewed_exactly(sandbox, state_url, sync):
    """Full reads plan against Atlassian as it is: an Entra group renamed to the name of a group made by hand
    in Atlassian. The dry run and the sync count alike, and the sync needs no 409 to find it."""
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    name = next(g["displayName"] for g in tenant.groups.values() if g["displayName"] not in ("Pilot", "Pilot Champions"))
    sandbox.scim.provision([scim_user("contractor@contoso.com")], {"Hand Made Team": ["contractor@contoso.com"]})
    tenant.rename_group(group_id(tenant, name), "Hand Made Team")
    status, preview = sync(sandbox.settings(state_url), full=True, dry_run=True)
    assert status == 0, preview
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0, summary
    assert nonzero(preview.counts) == nonzero(summary.counts)
    assert sandbox.scim.answered(409) == 0


def test_an_empty_tenant_against_a_populated_directory_writes_nothing(make_sandbox, state_url, sync):
    sandbox = make_sandbox()
    from tests.test_brownfield import PopulatedWorld

    PopulatedWorld(sandbox)
    before = (sandbox.scim.users(), sandbox.scim.groups())
    for group in list(sandbox.tenant.groups):
        sandbox.tenant.delete_group(group)
    for user in list(sandbox.tenant.users):
        sandbox.tenant.delete_user(user)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert scim_writes(sandbox) == 0 and (sandbox.scim.users(), sandbox.scim.groups()) == before


def test_an_adopted_account_with_another_email_gets_the_identifier_as_its_email(sandbox, state_url, sync):
    upn = sorted(expected_upns(sandbox.tenant))[0]
    account = scim_user(upn)
    account["emails"] = [{"value": f"old.{upn}", "type": "work", "primary": True}]
    ids = sandbox.scim.provision([account])
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    held = sandbox.scim.get_user(ids[upn])
    assert [e["value"] for e in held["emails"] if e.get("primary")] == [upn]
    assert held["externalId"] == entra_by_upn(sandbox.tenant)[upn]
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url), full=True)[0] == 0 and scim_writes(sandbox) == 0
