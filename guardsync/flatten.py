"""Flatten nested groups into effective user memberships (pure, pandas).

A group's effective users are the users directly in it or in any group it contains,
at any depth. Cycles (A in B in A, or A in A) are harmless: reachability is a
visited-set walk, so each group is expanded once per root. Devices, service
principals and contacts are not users and never become memberships.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import pandas as pd

from guardsync.models import EDGE_COLUMNS, MEMBERSHIP_COLUMNS, text_frame


def reachable_groups(edges: pd.DataFrame, roots: Iterable[str]) -> pd.DataFrame:
    """Pairs (group_id, descendant_id) for every group reachable from each root, itself included."""
    nested = edges[edges["member_type"] == "group"]
    children: dict[str, list[str]] = defaultdict(list)
    for parent, child in zip(nested["group_id"].tolist(), nested["member_id"].tolist()):
        children[parent].append(child)
    closure: dict[str, frozenset[str]] = {}
    pairs_group: list[str] = []
    pairs_descendant: list[str] = []
    for root in roots:
        reached = closure.get(root) or _walk(root, children)
        closure[root] = reached
        pairs_group.extend([root] * len(reached))
        pairs_descendant.extend(reached)
    return text_frame({"group_id": pairs_group, "descendant_id": pairs_descendant}, ["group_id", "descendant_id"])


def _walk(root: str, children: dict[str, list[str]]) -> frozenset[str]:
    seen = {root}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return frozenset(seen)


def effective_memberships(edges: pd.DataFrame, roots: Iterable[str]) -> pd.DataFrame:
    """(group_id, user_id) for each root group and every user it holds at any depth, no duplicates."""
    edges = text_frame(edges, EDGE_COLUMNS)  # an empty frame, however it was built, merges as text
    direct_users = edges.loc[edges["member_type"] == "user", ["group_id", "member_id"]]
    direct_users = direct_users.rename(columns={"group_id": "descendant_id", "member_id": "user_id"})
    pairs = reachable_groups(edges, roots)
    flat = pairs.merge(direct_users, on="descendant_id", how="inner")[MEMBERSHIP_COLUMNS]
    return flat.drop_duplicates(ignore_index=True)
