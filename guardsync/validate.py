"""Validate: run the three gates in pipeline order and derive the desired state.

The users gate quarantines users before groups are counted (a group's size is its
in-scope, enabled, non-quarantined users), so the group cap sees the real size.
All gates run before any write: a critical failure anywhere blocks the whole run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from zoneinfo import available_timezones

import pandas as pd

from guardsync.gates import GateResult, blocked_message, run_gate
from guardsync.models import ATTRIBUTES, DesiredGroup, DesiredUser, name_key
from guardsync.scope import Scoped, desired_groups, desired_users, groups_gate_frame, memberships_gate_frame


@dataclass
class Validated:
    users: dict[str, DesiredUser]
    groups: dict[str, DesiredGroup]
    quarantined: pd.DataFrame  # id, identifier, rule: users frozen this run
    frozen_groups: frozenset[str]
    results: list[GateResult]
    values_left_out: dict[str, int] = field(default_factory=dict)  # Atlassian attribute -> users sent without it
    frozen_group_names: dict[str, str] = field(default_factory=dict)  # quarantined group id -> its name

    @property
    def frozen_users(self) -> frozenset[str]:
        return frozenset(self.quarantined["id"])

    @property
    def frozen_names(self) -> frozenset[str]:
        """The identifiers of the frozen users (name_key): their accounts, managed or not, keep their groups."""
        return frozenset(name_key(i) for i in self.quarantined["identifier"] if isinstance(i, str) and i)

    @property
    def blocking(self) -> list[GateResult]:
        return [result for result in self.results if result.blocking]

    def blocked_message(self) -> str:
        return "\n".join(blocked_message(result) for result in self.blocking)

    def quarantined_by_rule(self) -> dict[str, int]:
        return self.quarantined["rule"].value_counts().to_dict() if len(self.quarantined) else {}


ATTRIBUTE_KEYS = {a.field: a.key for a in ATTRIBUTES}
USERS_GATE_COLUMNS = ["id", "identifier", "identifier_key", "display_name", "enabled", "preferred_language", "timezone"]


def validate(scoped: Scoped, max_group_size: int) -> Validated:
    users_result = run_gate("users", scoped.users[USERS_GATE_COLUMNS], {"time_zones": time_zones()})
    quarantined = _quarantined_users(scoped.users, users_result)
    frozen = frozenset(quarantined["id"])
    left_out = {column: ids - frozen for column, ids in users_result.dropped_values().items()}
    users = desired_users(scoped.users, frozen, left_out)
    values_left_out = {ATTRIBUTE_KEYS[column]: len(ids) for column, ids in left_out.items() if ids}

    all_groups = desired_groups(scoped.groups, scoped.memberships, users)
    groups_result = run_gate("groups", groups_gate_frame(all_groups), {"max_group_size": max_group_size})
    frozen_groups = groups_result.quarantined_ids
    groups = {gid: group for gid, group in all_groups.items() if gid not in frozen_groups}

    members_result = run_gate("memberships", memberships_gate_frame(groups))
    return Validated(users, groups, quarantined, frozen_groups, [users_result, groups_result, members_result],
                     values_left_out, {gid: all_groups[gid].display_name for gid in sorted(frozen_groups) if gid in all_groups})


@functools.cache
def time_zones() -> list[str]:
    """The IANA zone names (tzdata, which pandas installs): what Atlassian takes as a timezone."""
    return sorted(available_timezones())


def _quarantined_users(candidates: pd.DataFrame, result: GateResult) -> pd.DataFrame:
    """One row per quarantined user, with the first rule that caught it."""
    rule_of: dict[str, str] = {}
    for outcome in result.outcomes:
        if outcome.quarantines:
            for user_id in outcome.failed_ids:
                rule_of.setdefault(user_id, outcome.rule)
    rows = candidates[candidates["id"].isin(rule_of)]
    return pd.DataFrame(
        {"id": rows["id"], "identifier": rows["identifier"], "rule": rows["id"].map(rule_of)}
    ).reset_index(drop=True)
