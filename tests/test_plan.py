from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from guardsync.models import DesiredGroup, DesiredUser
from guardsync.models import AppliedGroup, AppliedState, AppliedUser
from guardsync.plan import apply_plan, make_plan


def user(uid, name=None, active=True, title="Engineer"):
    return DesiredUser(uid, name or f"{uid}@contoso.com", f"User {uid}", "User", uid, title, active)


def applied_from(users, groups):
    return AppliedState(
        users={u.external_id: AppliedUser(f"scim-{u.external_id}", u) for u in users},
        groups={g.external_id: AppliedGroup(f"scim-{g.external_id}", g.display_name) for g in groups},
        members={g.external_id: g.members for g in groups},
    )


def test_first_run_creates_users_groups_and_members():
    users = {u.external_id: u for u in [user("a"), user("b")]}
    groups = {"g": DesiredGroup("g", "Staff", frozenset({"a", "b"}))}
    plan = make_plan(users, groups, AppliedState())
    assert plan.counts()["users_created"] == 2
    assert plan.counts()["groups_created"] == 1
    assert plan.counts()["members_added"] == 2


def test_disabled_user_never_synced_is_not_created_but_a_synced_one_is_deactivated():
    before = applied_from([user("a")], [])
    desired = {"a": user("a", active=False), "b": user("b", active=False)}
    plan = make_plan(desired, {}, before)
    assert [(c.kind, c.user.external_id) for c in plan.users] == [("deactivate", "a")]
    assert plan.not_created_disabled == 1


def test_user_leaving_scope_is_deactivated_never_deleted_and_reactivated_on_return():
    before = applied_from([user("a"), user("b")], [])
    plan = make_plan({"a": user("a")}, {}, before)
    assert [(c.kind, c.user.external_id, c.user.active) for c in plan.users] == [("deactivate", "b", False)]
    after = apply_plan(before, plan)
    back = make_plan({"a": user("a"), "b": user("b")}, {}, after)
    assert [(c.kind, c.user.external_id) for c in back.users] == [("reactivate", "b")]


def test_renamed_user_is_an_update_of_the_same_account():
    before = applied_from([user("a", "old@contoso.com")], [])
    plan = make_plan({"a": user("a", "new@contoso.com")}, {}, before)
    assert [(c.kind, c.user.user_name) for c in plan.users] == [("update", "new@contoso.com")]


def test_group_rename_recreates_and_case_change_is_not_a_rename():
    group = DesiredGroup("g", "Sales", frozenset({"a"}))
    before = applied_from([user("a")], [group])
    renamed = make_plan({"a": user("a")}, {"g": replace(group, display_name="Sales EMEA")}, before)
    assert [(c.kind, c.display_name) for c in renamed.groups] == [("rename", "Sales EMEA")]
    assert renamed.members[0].add == ("a",)
    assert renamed.deprovisions() == 0
    recased = make_plan({"a": user("a")}, {"g": replace(group, display_name="SALES")}, before)
    assert recased.is_empty()


def test_frozen_users_keep_their_memberships_and_are_not_deactivated():
    group = DesiredGroup("g", "Staff", frozenset({"a", "q"}))
    before = applied_from([user("a"), user("q")], [group])
    # q is quarantined: absent from desired users and members, but frozen
    plan = make_plan({"a": user("a")}, {"g": DesiredGroup("g", "Staff", frozenset({"a"}))}, before, frozen_users=frozenset({"q"}))
    assert plan.is_empty()


def test_group_leaving_scope_is_deleted_and_counts_as_deprovision():
    before = applied_from([user("a")], [DesiredGroup("g", "Staff", frozenset({"a"}))])
    plan = make_plan({"a": user("a")}, {}, before)
    assert [(c.kind, c.group_id) for c in plan.groups] == [("delete", "g")]
    assert plan.deprovisions() == 1


ids = st.sampled_from([f"u{i}" for i in range(10)])
users_st = st.dictionaries(ids, st.tuples(st.booleans(), st.sampled_from(["A", "B"])), max_size=10)
groups_st = st.dictionaries(st.sampled_from(["g1", "g2", "g3"]), st.tuples(st.sampled_from(["Sales", "Ops", "Dev"]), st.frozensets(ids)), max_size=3)


def build(user_spec, group_spec):
    users = {uid: user(uid, active=active, title=title) for uid, (active, title) in user_spec.items()}
    enabled = {uid for uid, u in users.items() if u.active}
    groups = {gid: DesiredGroup(gid, name, members & enabled) for gid, (name, members) in group_spec.items()}
    return users, groups


def observable(state: AppliedState):
    return (
        {uid: u.record for uid, u in state.users.items() if u.record.active},
        {gid: g.display_name.casefold() for gid, g in state.groups.items()},
        {gid: m for gid, m in state.members.items() if gid in state.groups},
    )


@settings(max_examples=200, deadline=None)
@given(users_st, groups_st, users_st, groups_st)
def test_applying_the_plan_yields_the_desired_state_and_replanning_is_empty(u1, g1, u2, g2):
    first_users, first_groups = build(u1, g1)
    state = apply_plan(AppliedState(), make_plan(first_users, first_groups, AppliedState()))
    users, groups = build(u2, g2)
    after = apply_plan(state, make_plan(users, groups, state))
    active, names, members = observable(after)
    assert active == {uid: u for uid, u in users.items() if u.active}
    assert names == {gid: g.display_name.casefold() for gid, g in groups.items()}
    assert members == {gid: g.members for gid, g in groups.items()}
    assert make_plan(users, groups, after).is_empty()


# -- one planner: a partial observation is planned as a full one (issue 19) ----------------------------


def _resource(record: DesiredUser, scim_id: str, email: str | None = None) -> dict:
    from guardsync.scim import user_resource

    resource = {**user_resource(record), "id": scim_id}
    if email:
        resource["emails"] = [{"value": email, "type": "work", "primary": True}]
    return resource


def test_a_leaver_whose_email_was_edited_by_hand_is_written_with_its_own_user_name():
    from guardsync.observe import observe

    a = user("a")
    before = applied_from([a], [])
    observation = observe(before, [_resource(a, "scim-a", email="other@contoso.com")], [])
    assert observation.applied.users["a"].record.user_name == "a@contoso.com <other@contoso.com>"
    plan = make_plan({}, {}, before, observation=observation)
    assert [(c.kind, c.user.user_name, c.user.active) for c in plan.users] == [("deactivate", "a@contoso.com", False)]


def test_a_partial_observation_corrects_only_what_was_read():
    from guardsync.observe import observe_some

    group = DesiredGroup("g", "Staff", frozenset({"a", "b"}))
    before = applied_from([user("a"), user("b")], [group])
    observation = observe_some(before, [], [], missing_users={"scim-a"})
    assert set(observation.applied.users) == {"b"} and observation.gone_users == ["a"]
    assert observation.applied.members["g"] == {"b"} and not observation.complete
    plan = make_plan({"a": user("a"), "b": user("b")}, {"g": group}, before, observation=observation)
    assert [(c.kind, c.user.external_id) for c in plan.users] == [("create", "a")]  # re-created, back in its group
    assert [(c.group_id, c.add, c.remove) for c in plan.members] == [("g", ("a",), ())]


def test_a_renamed_user_adopts_the_unmanaged_account_of_its_new_identifier_and_lets_its_own_go():
    from guardsync.observe import observe_some

    group = DesiredGroup("g", "Staff", frozenset({"a"}))
    before = applied_from([user("a")], [group])
    renamed = user("a", "new@contoso.com")
    observation = observe_some(before, [_resource(replace(renamed, external_id=""), "scim-x")], [])
    plan = make_plan({"a": renamed}, {"g": group}, before, observation=observation)
    assert {(c.kind, c.scim_id, c.user.external_id, c.release) for c in plan.users} == {
        ("adopt", "scim-x", "a", False), ("deactivate", "scim-a", "", True)}
    assert plan.foreign == {"g": ("scim-a",)} and [(c.add, c.remove) for c in plan.members] == [(("a",), ())]
