"""The access plan and the Organizations API client's edge rules, on their own (no flow)."""

from __future__ import annotations

import pytest

from guardsync.access import BY_HAND, GUARDSYNC, make_access_plan, over_capacity, resolve_products, too_many_revocations
from guardsync.admin import AdminClient, Workspace
from guardsync.errors import ConfigError, GuardsyncError

JIRA = Workspace("w-jira", "jira-software", "a.atlassian.net")
CONF = Workspace("w-conf", "confluence", "a.atlassian.net", capacity=10, usage=8)
WORKSPACES = {w.id: w for w in (JIRA, CONF)}
MEMBERS = {"g1": frozenset({"u1", "u2"}), "g2": frozenset({"u2", "u3"})}


def plan(desired, observed, made=(), kinds=None, names=None, by_hand=()):
    ledger = {key: GUARDSYNC for key in made} | {key: BY_HAND for key in by_hand}
    return make_access_plan(desired, observed, ledger, kinds or {}, names or {"g1": "One", "g2": "Two"}, WORKSPACES,
                            MEMBERS, MEMBERS)


def test_grants_what_is_configured_and_missing_and_counts_distinct_users():
    p = plan({"g1": frozenset({"w-jira"}), "g2": frozenset({"w-jira"})}, {"g2": frozenset({"w-jira"})})
    assert [(g.group_id, g.workspace_id) for g in p.grants] == [("g1", "w-jira")] and p.revokes == []
    seats = p.seats["jira-software@a.atlassian.net"]
    assert (seats.grants, seats.gain, seats.lose) == (1, 1, 0)  # u2 had it through g2 already: only u1 gains


def test_revokes_only_what_guardsync_made():
    observed = {"g1": frozenset({"w-jira", "w-conf"})}
    p = plan({"g1": frozenset()}, observed, made=[("g1", "w-jira")])
    assert [(g.group_id, g.workspace_id) for g in p.revokes] == [("g1", "w-jira")]  # w-conf was made by hand: kept
    assert too_many_revocations(p, 0).rule == "max_revocations" and too_many_revocations(p, 1) is None


def test_a_renamed_group_gets_configured_and_hand_made_grants_and_a_deleted_one_takes_its_own():
    observed = {"g1": frozenset({"w-jira", "w-conf"}), "g2": frozenset({"w-jira"})}
    p = plan({"g1": frozenset({"w-jira"})}, observed, made=[("g1", "w-jira"), ("g2", "w-jira")],
             kinds={"g1": "rename", "g2": "delete"}, names={"g1": "One (new)"})
    assert {(g.workspace_id, g.maker) for g in p.grants_for("g1")} == {("w-jira", GUARDSYNC), ("w-conf", BY_HAND)}
    assert p.later_grants() == [] and p.revokes == []
    assert p.forget == [("g2", "w-jira")] and p.goes == {"g2"}  # forgotten once the record shows g2 gone


def test_every_renamed_synced_group_carries_its_grants_each_with_its_maker():
    observed = {"g1": frozenset({"w-jira", "w-conf"}), "g2": frozenset({"w-conf"})}
    p = plan({"g1": frozenset({"w-jira", "w-conf"})}, observed, made=[("g1", "w-conf")], by_hand=[("g1", "w-jira")],
             kinds={"g1": "rename", "g2": "rename"}, names={"g1": "One (new)", "g2": "Two (new)"})
    # g1: jira is configured but was made by hand, and stays so; g2 is in no mapping, and keeps its hand-made grant
    assert {(g.group_id, g.workspace_id, g.maker) for g in p.grants} == {
        ("g1", "w-jira", BY_HAND), ("g1", "w-conf", GUARDSYNC), ("g2", "w-conf", BY_HAND)}
    assert p.renamed == {"g1": "One (new)", "g2": "Two (new)"} and p.later_grants() == []
    assert {(g.group_id, g.workspace_id) for g in p.hand_made} == {("g2", "w-conf")}  # g1's jira: in the ledger already


def test_a_group_created_this_run_holds_nothing_whatever_its_name_held():
    # g2 (deleted) and g1 (created) share a name: what the Organizations API shows under it is g2's
    p = plan({"g1": frozenset({"w-jira"})}, {"g1": frozenset({"w-jira"})}, made=[("g2", "w-jira")],
             kinds={"g1": "create", "g2": "delete"}, names={"g1": "One"})
    assert [(g.group_id, g.workspace_id) for g in p.grants] == [("g1", "w-jira")] and p.revokes == []
    assert p.hand_made == [] and p.forget == [("g2", "w-jira")]
    seats = p.seats["jira-software@a.atlassian.net"]
    assert (seats.grants, seats.gain, seats.lose) == (1, 1, 1)  # u1 gains through g1; u3 loses it with g2


def test_a_product_dropped_from_a_renamed_group_stays_guardsyncs_until_the_old_group_goes():
    p = plan({"g1": frozenset({"w-jira"})}, {"g1": frozenset({"w-jira", "w-conf"})},
             made=[("g1", "w-jira"), ("g1", "w-conf")], kinds={"g1": "rename"}, names={"g1": "One (new)"})
    assert [g.workspace_id for g in p.grants] == ["w-jira"] and [g.workspace_id for g in p.dropped] == ["w-conf"]
    assert p.forget == [("g1", "w-conf")] and too_many_revocations(p, 0) is not None


def test_a_hand_made_grant_is_recorded_as_such_and_a_vanished_one_forgotten():
    p = plan({"g1": frozenset({"w-jira"})}, {"g1": frozenset({"w-jira", "w-conf"})}, by_hand=[("g1", "w-other")])
    assert [(g.workspace_id, g.maker) for g in p.hand_made] == [("w-conf", BY_HAND), ("w-jira", BY_HAND)]
    assert p.grants == p.revokes == [] and p.forget == [("g1", "w-other")]
    assert p.expected == {"g1": frozenset({"w-jira"})}


def test_capacity_counts_the_users_gaining_against_the_seats_in_use():
    p = plan({"g1": frozenset({"w-conf"}), "g2": frozenset({"w-conf"})}, {})  # u1, u2, u3 gain: 8 + 3 > 10
    blocked = over_capacity(p, WORKSPACES)
    assert blocked.rule == "seat_capacity" and "confluence@a.atlassian.net (capacity 10 seats, 8 in use, 3 users" in str(blocked)
    assert over_capacity(plan({"g1": frozenset({"w-conf"})}, {}), WORKSPACES) is None  # 8 + 2 fits


def test_product_keys_resolve_to_one_workspace_or_name_what_the_org_has():
    two = [JIRA, Workspace("w-jira-2", "jira-software", "b.atlassian.net"), CONF]
    assert resolve_products(["jira-software@B.atlassian.net"], two)["jira-software@B.atlassian.net"].id == "w-jira-2"
    with pytest.raises(ConfigError, match=r"jira-software on several sites \(a.atlassian.net, b.atlassian.net\)"):
        resolve_products(["jira-software"], two)
    with pytest.raises(ConfigError, match="no product 'compass'; it has confluence, jira-software"):
        resolve_products(["compass"], two)


def test_dry_run_refuses_every_write_but_lets_the_two_reading_posts_through(sandbox):
    admin = AdminClient(sandbox.org.base_url, sandbox.org.org_id, sandbox.scim.directory_id, sandbox.org_api_key,
                        dry_run=True)
    assert {w.product for w in admin.workspaces()} >= {"jira-software", "confluence"}
    assert admin.find_groups(["Pilot"]) == {}  # read, nothing there yet
    for write in (lambda: admin.assign("g", "ws-jira"), lambda: admin.revoke("g", "ws-jira"),
                  lambda: admin._call("POST", f"/admin/v2/orgs/{sandbox.org.org_id}/workspaces/extra")):
        with pytest.raises(GuardsyncError, match="dry-run: refused POST"):
            write()
    assert sandbox.org.writes() == 0 and sandbox.org.total() == 2
