import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from guardsync.flatten import effective_memberships
from guardsync.models import EDGE_COLUMNS


def edges(rows):
    return pd.DataFrame(rows, columns=EDGE_COLUMNS)


def as_pairs(frame):
    return set(zip(frame["group_id"], frame["user_id"]))


def test_nested_groups_reach_every_ancestor():
    frame = edges([
        ("top", "mid", "group"), ("mid", "leaf", "group"),
        ("leaf", "u1", "user"), ("mid", "u2", "user"), ("top", "u3", "user"),
    ])
    got = as_pairs(effective_memberships(frame, ["top", "mid", "leaf"]))
    assert got == {("top", "u1"), ("top", "u2"), ("top", "u3"), ("mid", "u1"), ("mid", "u2"), ("leaf", "u1")}


def test_cycles_and_self_nesting_terminate_and_share_members():
    frame = edges([("a", "b", "group"), ("b", "a", "group"), ("c", "c", "group"),
                   ("a", "u1", "user"), ("b", "u2", "user"), ("c", "u3", "user")])
    got = as_pairs(effective_memberships(frame, ["a", "b", "c"]))
    assert got == {("a", "u1"), ("a", "u2"), ("b", "u1"), ("b", "u2"), ("c", "u3")}


def test_devices_service_principals_and_contacts_are_not_members():
    frame = edges([("g", "d1", "device"), ("g", "sp", "servicePrincipal"), ("g", "c1", "orgContact"), ("g", "u1", "user")])
    assert as_pairs(effective_memberships(frame, ["g"])) == {("g", "u1")}


def test_a_user_reached_twice_is_one_membership():
    frame = edges([("g", "x", "group"), ("g", "y", "group"), ("x", "u", "user"), ("y", "u", "user"), ("g", "u", "user")])
    result = effective_memberships(frame, ["g"])
    assert len(result[result["group_id"] == "g"]) == 1


group_names = st.sampled_from([f"g{i}" for i in range(6)])
user_names = st.sampled_from([f"u{i}" for i in range(8)])
edge_lists = st.lists(
    st.one_of(st.tuples(group_names, group_names, st.just("group")), st.tuples(group_names, user_names, st.just("user"))),
    max_size=40,
)


def reference_closure(rows, root):
    """Naive fixpoint: the definition, not the algorithm."""
    reached = {root}
    changed = True
    while changed:
        changed = False
        for parent, child, kind in rows:
            if kind == "group" and parent in reached and child not in reached:
                reached.add(child)
                changed = True
    return {(root, child) for parent, child, kind in rows if kind == "user" and parent in reached}


@settings(max_examples=150, deadline=None)
@given(edge_lists, st.randoms())
def test_flatten_matches_the_definition_whatever_the_member_order(rows, rnd):
    roots = [f"g{i}" for i in range(6)]
    expected = set().union(*(reference_closure(rows, root) for root in roots))
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    assert as_pairs(effective_memberships(edges(rows), roots)) == expected
    assert as_pairs(effective_memberships(edges(shuffled), roots)) == expected
