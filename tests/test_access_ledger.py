"""The grant ledger (issue 19): every (Entra group, workspace) grant keeps its maker, guardsync or by hand,
across renames, deletions and mapping changes; the ledger changes only once Atlassian confirmed the write.

Each test is one numbered item of issue 19, run through the real flow against the sandbox; the assertions
read the Organizations API emulator's own record of the grants, never guardsync's idea of them.
"""

from __future__ import annotations

from guardsync.config import parse_settings
from tests.test_access import CONFLUENCE, JIRA, JPD, JSM_SUPPORT, MAPPING, group_id, org_writes, revoke_by_hand

ROLE_ASSIGNMENTS = "GET /admin/v2/orgs/{id}/directories/{id}/groups/{id}/role-assignments"


def scim_members(sandbox, name: str) -> set[str]:
    group = next(g for g in sandbox.scim.groups() if g["displayName"] == name)
    return {m["value"] for m in group.get("members") or []}


def assigned_while_present(sandbox, new_name: str, old_name: str) -> list[bool]:
    """For each assign to `new_name`: did the group `old_name` still exist in Atlassian at that moment?"""
    return [old_name in names for operation, group, _, names in sandbox.org.events
            if operation == "assign" and group == new_name]


# -- item 2: every synced group's grants move with a rename -------------------------------------------------


def test_a_renamed_group_without_configured_products_keeps_its_hand_made_grants(sandbox, state_url, sync):
    settings = sandbox.settings(state_url, MAPPING)  # Finance All is synced, and not in [access.groups]
    assert sync(settings)[0] == 0
    sandbox.org.grant_by_hand("Finance All", "ws-jpd")
    sandbox.org.grant_by_hand("Finance All", "ws-confluence")
    sandbox.tenant.rename_group(group_id(sandbox.tenant, "Finance All"), "Finance Everyone")
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    sandbox.org.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    grants = sandbox.org.grants()
    assert "Finance All" not in grants and grants["Finance Everyone"] == {JPD, CONFLUENCE}, grants
    assert assigned_while_present(sandbox, "Finance Everyone", "Finance All") == [True, True]
    assert summary.counts["access_granted"] == preview.counts["access_granted"] == org_writes(sandbox) == 2
    assert summary.renamed_groups == []  # its access moved along: nothing to grant again by hand
    # Still the admin's grants: a mapping that now gives the group confluence, then nothing, never revokes them.
    finance = group_id(sandbox.tenant, "Finance Everyone")
    for products in (["confluence"], []):
        status, summary = sync(sandbox.settings(state_url, {**MAPPING, finance: products}))
        assert status == 0, summary
        assert sandbox.org.grants()["Finance Everyone"] == {JPD, CONFLUENCE}
        assert summary.counts.get("access_revoked", 0) == summary.counts.get("access_granted", 0) == 0


# -- item 3: a group created this run holds nothing, whatever its name held -----------------------------------


def test_a_configured_group_deleted_and_created_again_under_its_name_gets_its_products(sandbox, state_url, sync):
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url, MAPPING)  # by name: the new group of that name is the configured one
    assert sync(settings)[0] == 0
    old = group_id(tenant, "Engineering All")
    old_members = scim_members(sandbox, "Engineering All")
    support = scim_members(sandbox, "Support All")  # confluence through Support All stays theirs
    keep = [m for m in tenant.members[old] if tenant.type_of(m) == "user"][:3]
    tenant.delete_group(old)
    new = tenant.add_group("Engineering All")
    for member in keep:
        tenant.add_member(new, member)
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    sandbox.org.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert sandbox.org.grants()["Engineering All"] == {JIRA, CONFLUENCE}
    assert summary.counts["access_granted"] == preview.counts["access_granted"] == org_writes(sandbox) == 2
    new_members = scim_members(sandbox, "Engineering All")
    assert new_members and new_members < old_members
    text = "\n".join(summary.lines())
    assert f"{JIRA}: grants +1 -0, synced users gaining 0, losing {len(old_members - new_members)}" in text, text
    assert f"{CONFLUENCE}: grants +1 -0, synced users gaining 0, losing {len(old_members - new_members - support)}" in text
    assert preview.access == summary.access
    sandbox.org.reset_counts()
    assert sync(settings, full=True)[0] == 0 and org_writes(sandbox) == 0


# -- item 4: a hand-made grant stays hand-made across a rename ---------------------------------------------------


def test_a_hand_made_grant_of_a_configured_product_stays_hand_made_across_a_rename(sandbox, state_url, sync):
    engineering = group_id(sandbox.tenant, "Engineering All")
    assert sync(sandbox.settings(state_url, {engineering: ["confluence"]}))[0] == 0
    sandbox.org.grant_by_hand("Engineering All", "ws-jira")  # an admin's, before guardsync was told about jira
    both = sandbox.settings(state_url, {engineering: ["jira-software", "confluence"]})
    status, summary = sync(both)
    assert status == 0 and summary.counts.get("access_granted", 0) == 0, summary  # held already: nothing to do
    sandbox.tenant.rename_group(engineering, "Engineering Everyone")
    status, summary = sync(both)
    assert status == 0, summary
    assert sandbox.org.grants()["Engineering Everyone"] == {JIRA, CONFLUENCE}
    config = sandbox.config(state_url, {engineering: ["confluence"]})  # jira leaves the mapping: the admin's grant stays
    config["access"]["max_revocations"] = 1  # would let a (wrong) revocation through rather than block on it
    status, summary = sync(parse_settings(config))
    assert status == 0, summary
    assert sandbox.org.grants()["Engineering Everyone"] == {JIRA, CONFLUENCE}
    assert summary.counts.get("access_revoked", 0) == 0


# -- item 5: the ledger changes only after Atlassian confirmed -----------------------------------------------------


def test_a_product_dropped_when_its_renamed_group_is_not_yet_visible_ends_revoked(sandbox, state_url, sync, monkeypatch):
    """The Organizations API sees a group created over SCIM a moment later: the rename stops before the old
    group goes, and the confluence grant it drops stays guardsync's until the old group is really gone."""
    from guardsync.sandbox.org_api import OrgApiServer

    engineering = group_id(sandbox.tenant, "Engineering All")
    assert sync(sandbox.settings(state_url, {engineering: ["jira-software", "confluence"]}))[0] == 0
    sandbox.tenant.rename_group(engineering, "Engineering Everyone")
    config = sandbox.config(state_url, {engineering: ["jira-software"]})
    config["access"]["max_revocations"] = 1
    names = OrgApiServer._group_names_by_scim_id
    monkeypatch.setattr(OrgApiServer, "_group_names_by_scim_id",
                        lambda self: {i: n for i, n in names(self).items() if n != "Engineering Everyone"})
    status, summary = sync(parse_settings(config))
    assert status == 1 and summary.failures, summary
    assert sandbox.org.grants().get("Engineering All") == {JIRA, CONFLUENCE}  # the members keep their access meanwhile
    monkeypatch.setattr(OrgApiServer, "_group_names_by_scim_id", names)
    for _ in range(2):  # the run that completes the rename, then one more: confluence never comes back
        status, summary = sync(parse_settings(config))
        assert status == 0, summary
        assert sandbox.org.grants() == {"Engineering Everyone": {JIRA}}
    config["access"]["groups"] = {}  # and jira, guardsync's, is revoked when the mapping drops it
    status, summary = sync(parse_settings(config))
    assert status == 0 and summary.counts["access_revoked"] == 1, summary
    assert sandbox.org.grants() == {}


# -- item 11: two Entra groups of one name -----------------------------------------------------------------------


def test_a_second_entra_group_with_a_configured_name_leaves_its_access_alone_and_says_why(sandbox, state_url, sync):
    settings = sandbox.settings(state_url, MAPPING)
    assert sync(settings)[0] == 0
    first = group_id(sandbox.tenant, "Engineering All")
    second = sandbox.tenant.add_group("Engineering All")
    sandbox.tenant.add_member(second, next(iter(sandbox.tenant.users)))
    grants_before = sandbox.org.grants()
    sandbox.org.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary  # the groups gate quarantined both; the other groups' access goes on
    assert sandbox.org.grants() == grants_before and org_writes(sandbox) == 0
    said = [line for line in summary.lines() if "'Engineering All'" in line]
    assert len(said) == 1 and first in said[0] and second in said[0] and "rename" in said[0], summary.lines()
    # Only when it matters: a duplicate of a group [access] does not name stays the groups gate's business.
    sandbox.tenant.rename_group(second, "Finance All")
    status, summary = sync(settings)
    assert status == 0, summary
    assert not [line for line in summary.lines() if "'Finance All'" in line and "Entra groups" in line]
    assert sandbox.org.grants() == grants_before


# -- item 12: a hand revocation is repaired by the next run, also when nothing changed in Entra ------------------


def test_a_grant_removed_by_hand_is_restored_by_a_run_with_no_change_in_entra(sandbox, state_url, sync):
    settings = sandbox.settings(state_url, MAPPING)
    assert sync(settings)[0] == 0
    assert sync(settings)[0] == 0  # settled: nothing changed in Entra since a completed run
    revoke_by_hand(sandbox, "Support All", "ws-confluence")
    sandbox.org.reset_counts()
    status, summary = sync(settings)
    assert status == 0, summary
    assert sandbox.org.grants()["Support All"] == {JSM_SUPPORT, CONFLUENCE}
    assert summary.counts["access_granted"] == org_writes(sandbox) == 1
    # The cost of a run with no change anywhere: one role-assignments read per configured group, nothing else.
    sandbox.org.reset_counts(), sandbox.scim.reset_counts()
    status, summary = sync(settings)
    assert status == 0 and "nothing to do" in summary.message, summary
    assert dict(sandbox.org.requests) == {ROLE_ASSIGNMENTS: len(MAPPING)}
    assert summary.requests["organizations"] == len(MAPPING) and summary.requests["scim"] == 0
