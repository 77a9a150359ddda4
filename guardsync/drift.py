"""Drift: managed objects changed by hand in Atlassian (pure).

A full run reads what Atlassian holds and replaces the recorded state of each
managed object with what is really there; the ordinary plan then restores it.
Objects guardsync does not manage are never looked at twice: they are skipped here
and stay untouched, except people added by hand to a managed group, whom the
contract removes (a managed group's members are exactly the synced ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from guardsync.models import DesiredUser
from guardsync.plan import AppliedGroup, AppliedState, AppliedUser


@dataclass
class DriftReport:
    users_changed: list[str] = field(default_factory=list)  # userNames edited, deactivated or reactivated by hand
    users_missing: list[str] = field(default_factory=list)  # deleted by hand: re-created
    groups_missing: list[str] = field(default_factory=list)  # deleted by hand: re-created
    groups_changed: list[str] = field(default_factory=list)  # members changed by hand
    foreign_members: dict[str, list[str]] = field(default_factory=dict)  # group id -> SCIM ids to remove

    def count(self) -> int:
        return len(self.users_changed) + len(self.users_missing) + len(self.groups_missing) + len(self.groups_changed)

    def lines(self) -> list[str]:
        parts = [("users changed by hand", self.users_changed), ("users deleted by hand", self.users_missing),
                 ("groups deleted by hand", self.groups_missing), ("groups whose members changed by hand", self.groups_changed)]
        return [f"{label}: {len(names)} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                for label, names in parts if names]


def observed_user(resource: dict, recorded: DesiredUser) -> DesiredUser:
    """The user as Atlassian holds it, in the shape guardsync records (so the plan can compare)."""
    name = resource.get("name") or {}
    emails = resource.get("emails") or []
    primary = next((e.get("value") for e in emails if e.get("primary")), emails[0].get("value") if emails else None)
    user_name = resource.get("userName") or ""
    if primary != user_name:
        user_name = f"{user_name} <{primary}>"  # an email edited by hand: differs from any desired record
    return replace(
        recorded,
        user_name=user_name,
        display_name=resource.get("displayName") or "",
        given_name=name.get("givenName") or "",
        family_name=name.get("familyName") or "",
        title=resource.get("title") or "",
        active=bool(resource.get("active", True)),
    )


def detect_drift(applied: AppliedState, scim_users: list[dict], scim_groups: list[dict]) -> tuple[AppliedState, DriftReport]:
    """Recorded state corrected by what Atlassian really holds, and what differed."""
    report = DriftReport()
    by_scim_user = {user["id"]: user for user in scim_users}
    users: dict[str, AppliedUser] = {}
    for user_id, recorded in applied.users.items():
        resource = by_scim_user.get(recorded.scim_id)
        if resource is None:
            report.users_missing.append(recorded.record.user_name)
            continue
        seen = observed_user(resource, recorded.record)
        if seen != recorded.record:
            report.users_changed.append(recorded.record.user_name)
        users[user_id] = AppliedUser(recorded.scim_id, seen)

    managed_by_scim = {u.scim_id: uid for uid, u in users.items()}
    by_scim_group = {group["id"]: group for group in scim_groups}
    groups: dict[str, AppliedGroup] = {}
    members: dict[str, frozenset[str]] = {}
    for group_id, recorded in applied.groups.items():
        resource = by_scim_group.get(recorded.scim_id)
        if resource is None:
            report.groups_missing.append(recorded.display_name)
            continue
        groups[group_id] = AppliedGroup(recorded.scim_id, resource.get("displayName") or recorded.display_name)
        present = [m["value"] for m in resource.get("members") or []]
        managed = frozenset(managed_by_scim[s] for s in present if s in managed_by_scim)
        foreign = [s for s in present if s not in managed_by_scim]
        members[group_id] = managed
        if managed != applied.members.get(group_id, frozenset()) or foreign:
            report.groups_changed.append(recorded.display_name)
        if foreign:
            report.foreign_members[group_id] = foreign
    return AppliedState(users, groups, members), report
