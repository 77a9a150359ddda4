"""The plan: a pure diff of the desired state against the state applied before.

Quarantined users and groups are frozen: nothing about them changes this run,
including their memberships. Users are never deleted, only deactivated. A renamed
group is re-created under its new name, since Atlassian refuses renames.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

from guardsync.models import DesiredGroup, DesiredUser

UserKind = Literal["create", "update", "deactivate", "reactivate"]
GroupKind = Literal["create", "delete", "rename"]


@dataclass(frozen=True)
class AppliedUser:
    scim_id: str
    record: DesiredUser  # exactly what was last written to Atlassian


@dataclass(frozen=True)
class AppliedGroup:
    scim_id: str
    display_name: str


@dataclass
class AppliedState:
    users: dict[str, AppliedUser] = field(default_factory=dict)  # by Entra id
    groups: dict[str, AppliedGroup] = field(default_factory=dict)  # by Entra id
    members: dict[str, frozenset[str]] = field(default_factory=dict)  # group id -> user ids

    def active_users(self) -> int:
        return sum(1 for user in self.users.values() if user.record.active)


@dataclass(frozen=True)
class UserChange:
    kind: UserKind
    user: DesiredUser  # the record to write


@dataclass(frozen=True)
class GroupChange:
    kind: GroupKind
    group_id: str
    display_name: str  # the new name for create/rename, the current one for delete


@dataclass(frozen=True)
class MemberChange:
    group_id: str
    add: tuple[str, ...]
    remove: tuple[str, ...]


@dataclass
class Plan:
    users: list[UserChange] = field(default_factory=list)
    groups: list[GroupChange] = field(default_factory=list)
    members: list[MemberChange] = field(default_factory=list)
    not_created_disabled: int = 0  # disabled users never synced: nothing to do

    def counts(self) -> dict[str, int]:
        users = Counter(change.kind for change in self.users)
        groups = Counter(change.kind for change in self.groups)
        return {
            "users_created": users["create"],
            "users_updated": users["update"],
            "users_deactivated": users["deactivate"],
            "users_reactivated": users["reactivate"],
            "groups_created": groups["create"],
            "groups_renamed": groups["rename"],
            "groups_deleted": groups["delete"],
            "members_added": sum(len(change.add) for change in self.members),
            "members_removed": sum(len(change.remove) for change in self.members),
        }

    def is_empty(self) -> bool:
        return not (self.users or self.groups or self.members)

    def deprovisions(self) -> int:
        """Deactivations plus group deletions (renames are not deletions): what the guard counts."""
        counts = self.counts()
        return counts["users_deactivated"] + counts["groups_deleted"]


def plan_users(
    desired: dict[str, DesiredUser], applied: dict[str, AppliedUser], frozen: frozenset[str]
) -> tuple[list[UserChange], int]:
    changes: list[UserChange] = []
    not_created = 0
    for user_id, user in desired.items():
        before = applied.get(user_id)
        if before is None:
            if user.active:
                changes.append(UserChange("create", user))
            else:
                not_created += 1  # a disabled user who never reached Atlassian is not created
        elif before.record != user:
            changes.append(UserChange(_user_kind(before.record.active, user.active), user))
    for user_id, before in applied.items():
        if user_id not in desired and user_id not in frozen and before.record.active:
            # Left scope (or was deleted in Entra): deactivate, never delete.
            changes.append(UserChange("deactivate", replace(before.record, active=False)))
    return changes, not_created


def _user_kind(was_active: bool, is_active: bool) -> UserKind:
    if was_active and not is_active:
        return "deactivate"
    if is_active and not was_active:
        return "reactivate"
    return "update"


def plan_groups(
    desired: dict[str, DesiredGroup], applied: dict[str, AppliedGroup], frozen: frozenset[str]
) -> list[GroupChange]:
    changes = []
    for group_id, group in desired.items():
        before = applied.get(group_id)
        if group_id in frozen:
            continue
        if before is None:
            changes.append(GroupChange("create", group_id, group.display_name))
        elif before.display_name.casefold() != group.display_name.casefold():
            changes.append(GroupChange("rename", group_id, group.display_name))
    for group_id, before in applied.items():
        if group_id not in desired and group_id not in frozen:
            changes.append(GroupChange("delete", group_id, before.display_name))
    return changes


def plan_members(
    desired: dict[str, DesiredGroup],
    applied: AppliedState,
    group_changes: list[GroupChange],
    frozen_users: frozenset[str],
    frozen_groups: frozenset[str],
) -> list[MemberChange]:
    recreated = {change.group_id for change in group_changes if change.kind in ("create", "rename")}
    changes = []
    for group_id, group in desired.items():
        if group_id in frozen_groups:
            continue
        before = applied.members.get(group_id, frozenset())
        target = group.members - frozen_users
        if group_id in recreated:  # starts empty, and takes its frozen members along unchanged
            current, target = frozenset(), target | (before & frozen_users)
        else:
            current = before - frozen_users
        add, remove = target - current, current - target
        if add or remove:
            changes.append(MemberChange(group_id, tuple(sorted(add)), tuple(sorted(remove))))
    return changes


def make_plan(
    users: dict[str, DesiredUser],
    groups: dict[str, DesiredGroup],
    applied: AppliedState,
    frozen_users: frozenset[str] = frozenset(),
    frozen_groups: frozenset[str] = frozenset(),
) -> Plan:
    user_changes, not_created = plan_users(users, applied.users, frozen_users)
    group_changes = plan_groups(groups, applied.groups, frozen_groups)
    member_changes = plan_members(groups, applied, group_changes, frozen_users, frozen_groups)
    return Plan(user_changes, group_changes, member_changes, not_created)


def apply_plan(applied: AppliedState, plan: Plan) -> AppliedState:
    """The state a fully successful load of `plan` leaves (used by the property tests)."""
    users = dict(applied.users)
    for change in plan.users:
        scim_id = users[change.user.external_id].scim_id if change.user.external_id in users else "new"
        users[change.user.external_id] = AppliedUser(scim_id, change.user)
    groups = dict(applied.groups)
    members = dict(applied.members)
    for change in plan.groups:
        if change.kind == "delete":
            groups.pop(change.group_id, None)
            members.pop(change.group_id, None)
        else:
            groups[change.group_id] = AppliedGroup("new", change.display_name)
            members[change.group_id] = frozenset()
    for change in plan.members:
        current = members.get(change.group_id, frozenset())
        members[change.group_id] = (current | set(change.add)) - set(change.remove)
    return AppliedState(users, groups, members)
