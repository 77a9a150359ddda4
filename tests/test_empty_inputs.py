"""Empty and one-element inputs through every pure stage: flatten, scope, gates, plan.

A tenant with no users, a group with no members, a scope with nobody in it: each must flow
through the pipeline to a plan (and the guards), never to a pandas error on an empty frame.
Frames are built as the Graph client builds them (guardsync.models.text_frame), and also as
pandas builds them from empty lists (float64 columns), which is what a careless producer gives.
"""

from __future__ import annotations

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from guardsync.config import SyncSettings
from guardsync.flatten import effective_memberships
from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, MEMBERSHIP_COLUMNS, USER_COLUMNS, DesiredGroup, DesiredUser, Snapshot, text_frame
from guardsync.observe import AtlassianGroup, AtlassianUser, Observation, DriftReport
from guardsync.models import AppliedState, AppliedUser
from guardsync.plan import apply_plan, make_plan
from guardsync.scope import scope
from guardsync.validate import validate

DOMAIN = "contoso.com"


def users_frame(rows: list[dict], careless: bool) -> pd.DataFrame:
    data = {c: [row.get(c) for row in rows] for c in USER_COLUMNS}
    data["accountEnabled"] = [bool(row.get("accountEnabled")) for row in rows]
    return pd.DataFrame(data, columns=USER_COLUMNS) if careless else text_frame(data, USER_COLUMNS)


def frame(rows: list[tuple], columns: list[str], careless: bool) -> pd.DataFrame:
    data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
    return pd.DataFrame(data, columns=columns) if careless else text_frame(data, columns)


user_rows = st.lists(st.fixed_dictionaries({
    "id": st.sampled_from(["u1", "u2"]),
    "userPrincipalName": st.sampled_from(["a@contoso.com", "B@contoso.com", "x#EXT#@contoso.com", "c@other.example", None]),
    "mail": st.sampled_from(["a@contoso.com", None]),
    "displayName": st.sampled_from(["A", None]),
    "accountEnabled": st.booleans(),
}), max_size=1)
group_rows = st.lists(st.tuples(st.sampled_from(["g1", "g2"]), st.sampled_from(["Staff", "", None])), max_size=1)
edge_rows = st.lists(st.tuples(st.sampled_from(["g1", "g2"]), st.sampled_from(["u1", "g1", "d1"]),
                               st.sampled_from(["user", "group", "device"])), max_size=1)


def snapshot(users, groups, edges, careless) -> Snapshot:
    return Snapshot("tenant", "Contoso", users_frame(users, careless), frame(groups, GROUP_COLUMNS, careless),
                    frame(edges, EDGE_COLUMNS, careless), [DOMAIN, "contoso.onmicrosoft.com"], "contoso.onmicrosoft.com")


@settings(max_examples=60, deadline=None)
@given(edge_rows, st.lists(st.sampled_from(["g1", "g2"]), max_size=1), st.booleans())
def test_flatten_of_empty_and_single_edges(edges, roots, careless):
    flat = effective_memberships(frame(edges, EDGE_COLUMNS, careless), roots)
    assert list(flat.columns) == MEMBERSHIP_COLUMNS
    expected = {(g, m) for g, m, kind in edges if kind == "user" and g in roots}
    assert set(zip(flat["group_id"], flat["user_id"])) == expected


@settings(max_examples=40, deadline=None)
@given(user_rows, group_rows, edge_rows, st.booleans())
def test_scope_gates_and_plan_of_empty_and_single_element_tenants(users, groups, edges, careless):
    snap = snapshot(users, groups, edges, careless)
    memberships = effective_memberships(snap.edges, snap.groups["id"])
    scoped = scope(snap, memberships, SyncSettings())
    assert len(scoped.users) <= len(users) and len(scoped.groups) == len(groups)
    validated = validate(scoped, max_group_size=10)
    nameless = any(not name for _, name in groups)  # Graph requires a displayName: the groups gate blocks one without
    assert bool(validated.blocking) == nameless
    if nameless:
        return
    assert set(validated.users) <= {row["id"] for row in users}
    plan = make_plan(validated.users, validated.groups, AppliedState(), validated.frozen_users, validated.frozen_groups)
    assert plan.counts()["users_created"] == sum(1 for user in validated.users.values() if user.active)
    after = apply_plan(AppliedState(), plan)
    assert make_plan(validated.users, validated.groups, after, validated.frozen_users, validated.frozen_groups).is_empty()


def person(uid: str, name: str, active: bool = True, external_id: str | None = None) -> DesiredUser:
    return DesiredUser(uid if external_id is None else external_id, name, name, "", "", "", active)


accounts = st.lists(st.tuples(st.sampled_from(["a@contoso.com", "A@CONTOSO.COM", "z@contoso.com"]), st.booleans(),
                              st.sampled_from(["", "u1", "other"])), max_size=1)
desired_users = st.dictionaries(st.sampled_from(["u1"]), st.tuples(st.sampled_from(["a@contoso.com", "b@contoso.com"]),
                                                                   st.booleans()), max_size=1)
unmanaged_groups = st.lists(st.tuples(st.sampled_from(["Staff", "STAFF", "Other"]), st.booleans()), max_size=1)


@settings(max_examples=150, deadline=None)
@given(desired_users, accounts, unmanaged_groups, st.booleans())
def test_planning_against_an_observation_of_zero_or_one_objects(users, found, groups, in_group):
    """Adopt what matches, create the rest, never touch the others; applied, the plan is the desired state."""
    desired = {uid: person(uid, name, active) for uid, (name, active) in users.items()}
    enabled = frozenset(uid for uid, user in desired.items() if user.active)
    wanted = {"g1": DesiredGroup("g1", "Staff", enabled if in_group else frozenset())}
    unmanaged = [AtlassianUser(f"s{i}", person("", name, active, external_id=ext)) for i, (name, active, ext) in enumerate(found)]
    account_ids = tuple(a.scim_id for a in unmanaged)
    observed_groups = [AtlassianGroup(f"sg{i}", name, "", account_ids if members else ())
                       for i, (name, members) in enumerate(groups)]
    observation = Observation(AppliedState(), unmanaged, observed_groups, {}, [], [], DriftReport())
    plan = make_plan(desired, wanted, AppliedState(), observation=observation)

    matched = {c.scim_id for c in plan.users if c.adopted}
    for account in unmanaged:  # adopted exactly when its userName (any case) or externalId is the user's
        user = desired.get("u1")
        by_name = user is not None and account.record.user_name.casefold() == user.user_name.casefold()
        assert (account.scim_id in matched) == (user is not None and (by_name or account.record.external_id == "u1"))
    created = [c for c in plan.users if c.kind == "create"]
    assert all(c.user.active for c in created)  # a disabled user is never created
    assert plan.counts()["users_deactivated"] == sum(
        1 for c in plan.users if c.adopted and not c.user.active and c.kind == "deactivate")
    adopted_group = [c for c in plan.groups if c.kind == "adopt"]
    assert len(adopted_group) == sum(1 for name, _ in groups if name.casefold() == "staff")
    for scim_ids in plan.foreign.values():  # only accounts nobody adopted leave an adopted group
        assert not set(scim_ids) & matched
    after = apply_plan(AppliedState(), plan)
    assert {uid: u.record for uid, u in after.users.items()} == {uid: u for uid, u in desired.items() if uid in after.users}
    assert after.members.get("g1", frozenset()) == wanted["g1"].members
    assert make_plan(desired, wanted, after).is_empty()


def test_a_scope_with_nobody_in_it_plans_deactivations_and_the_guard_sees_them():
    alice = person("u1", "a@contoso.com")
    applied = AppliedState({"u1": AppliedUser("s1", alice)})
    plan = make_plan({}, {}, applied)
    assert [(c.kind, c.scim_id) for c in plan.users] == [("deactivate", "s1")]
    from guardsync.guards import empty_scope

    assert empty_scope(0, applied) is not None
