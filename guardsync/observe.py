"""Atlassian as it is: one read of the directory's users and groups, in the plan's terms (pure).

First runs (an empty state), full reads and runs after an interrupted observing run list
Atlassian before planning. This module turns that listing into an Observation:

- the managed objects (those the state records) as Atlassian really holds them, so the
  plan restores what people changed by hand (drift), and finds those deleted by hand (gone);
- every other account and group, unmanaged, which the plan may adopt (same userName or
  displayName, case-insensitive) and otherwise never touches;
- for each managed group, the members Atlassian holds that are not managed accounts
  (foreign): the plan removes them, unless it adopts their account this run.

Delta runs read only what they need (observe_some): the objects a write met 404 or 409 on, and
the one fact a delta plan lacks (does a disabled newcomer have an account?). That partial
observation is the record corrected where something was read, planned by the same planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guardsync.changes import AttributeChange, hand_edits
from guardsync.models import AppliedGroup, AppliedState, AppliedUser, DesiredUser
from guardsync.scim import user_from_resource


@dataclass(frozen=True)
class AtlassianUser:
    """An account guardsync does not manage (yet), as Atlassian holds it."""

    scim_id: str
    record: DesiredUser  # external_id is the account's externalId ("" when it has none)


@dataclass(frozen=True)
class AtlassianGroup:
    """A group guardsync does not manage (yet)."""

    scim_id: str
    display_name: str
    external_id: str
    members: tuple[str, ...]  # SCIM ids of its members


@dataclass
class DriftReport:
    users_changed: list[str] = field(default_factory=list)  # userNames edited, deactivated or reactivated by hand
    users_missing: list[str] = field(default_factory=list)  # deleted by hand
    groups_missing: list[str] = field(default_factory=list)  # deleted by hand
    groups_changed: list[str] = field(default_factory=list)  # members changed by hand
    user_edits: dict[str, list[AttributeChange]] = field(default_factory=dict)  # userName -> written -> held by hand

    def count(self) -> int:
        return len(self.users_changed) + len(self.users_missing) + len(self.groups_missing) + len(self.groups_changed)

    def lines(self) -> list[str]:
        parts = [("users changed by hand", self.users_changed), ("users deleted by hand", self.users_missing),
                 ("groups deleted by hand", self.groups_missing), ("groups whose members changed by hand", self.groups_changed)]
        return [f"{label}: {len(names)} ({', '.join(self._named(names[:10]))}{', ...' if len(names) > 10 else ''})"
                for label, names in parts if names]

    def _named(self, names: list[str]) -> list[str]:
        """A user edited by hand with the attributes edited: `uma@contoso.com (title, name.familyName)`."""
        return [f"{name} ({', '.join(c.attribute for c in self.user_edits[name])})" if self.user_edits.get(name) else name
                for name in names]

    def edit_rows(self) -> list[dict]:
        """One row per attribute edited by hand: what guardsync wrote, what Atlassian held (this run restores it)."""
        return [{"user": name, "attribute": change.attribute, "written by guardsync": change.shown[0],
                 "found in Atlassian": change.shown[1]}
                for name, changes in self.user_edits.items() for change in changes]


@dataclass
class Observation:
    applied: AppliedState  # the managed objects as Atlassian holds them; gone ones left out
    unmanaged_users: list[AtlassianUser]
    unmanaged_groups: list[AtlassianGroup]
    foreign_members: dict[str, tuple[str, ...]]  # managed group id -> SCIM ids of members not managed
    gone_users: list[str]  # Entra ids of managed accounts deleted by hand
    gone_groups: list[str]  # Entra ids of managed groups deleted by hand
    drift: DriftReport
    complete: bool = True  # a listing of everything; False: some objects read, the rest as the record has them
    names_read: frozenset[str] = frozenset()  # (not complete) identifiers looked up (name_key), found or not


def observed_record(resource: dict) -> DesiredUser:
    """A SCIM user in the shape guardsync records, every mapped attribute included, so the plan can
    compare it with the desired one (the conversion itself is guardsync.scim.user_from_resource)."""
    return DesiredUser(**user_from_resource(resource))


def observe(recorded: AppliedState, scim_users: list[dict], scim_groups: list[dict]) -> Observation:
    """What Atlassian holds, from a listing of all of it: managed objects (corrected from the record; those
    not listed are gone) and unmanaged ones."""
    listed_users = {user["id"] for user in scim_users}
    listed_groups = {group["id"] for group in scim_groups}
    return observe_some(recorded, scim_users, scim_groups,
                        missing_users={u.scim_id for u in recorded.users.values() if u.scim_id not in listed_users},
                        missing_groups={g.scim_id for g in recorded.groups.values() if g.scim_id not in listed_groups},
                        complete=True)


def observe_some(recorded: AppliedState, scim_users: list[dict], scim_groups: list[dict],
                 missing_users: set[str] = frozenset(), missing_groups: set[str] = frozenset(),
                 names_read: frozenset[str] = frozenset(), complete: bool = False) -> Observation:
    """What Atlassian holds, from the objects a run read (by id, userName, externalId, displayName): the
    record, corrected where an object was read. `missing_*` are SCIM ids Atlassian answered 404 for.

    A partial observation is planned exactly as a full one (guardsync.plan.make_plan): the planner
    cannot tell them apart, so a delta run that reads a few objects plans them as a full read would."""
    drift = DriftReport()
    by_scim_user = {user["id"]: user for user in scim_users}
    users: dict[str, AppliedUser] = {}
    gone_users = []
    for user_id, before in recorded.users.items():
        if before.scim_id in missing_users:
            drift.users_missing.append(before.record.user_name)
            gone_users.append(user_id)
            continue
        resource = by_scim_user.get(before.scim_id)
        if resource is None:  # not read: as recorded
            users[user_id] = before
            continue
        seen = observed_record(resource)
        if seen != before.record:
            drift.users_changed.append(before.record.user_name)
            drift.user_edits[before.record.user_name] = hand_edits(before.record, resource, seen)
        users[user_id] = AppliedUser(before.scim_id, seen)
    managed_by_scim = {user.scim_id: user_id for user_id, user in users.items()}
    unmanaged_users = [AtlassianUser(scim_id, observed_record(resource))
                       for scim_id, resource in by_scim_user.items() if scim_id not in managed_by_scim]

    by_scim_group = {group["id"]: group for group in scim_groups}
    groups: dict[str, AppliedGroup] = {}
    members: dict[str, frozenset[str]] = {}
    foreign: dict[str, tuple[str, ...]] = {}
    gone_groups = []
    for group_id, before in recorded.groups.items():
        if before.scim_id in missing_groups:
            drift.groups_missing.append(before.display_name)
            gone_groups.append(group_id)
            continue
        resource = by_scim_group.pop(before.scim_id, None)
        if resource is None:  # not read: as recorded, less the accounts found gone (they left every group)
            groups[group_id] = before
            members[group_id] = recorded.members.get(group_id, frozenset()) - set(gone_users)
            continue
        groups[group_id] = AppliedGroup(before.scim_id, resource.get("displayName") or before.display_name)
        present = [member["value"] for member in resource.get("members") or []]
        members[group_id] = frozenset(managed_by_scim[s] for s in present if s in managed_by_scim)
        if outside := tuple(s for s in present if s not in managed_by_scim):
            foreign[group_id] = outside
        if members[group_id] != recorded.members.get(group_id, frozenset()) or outside:
            drift.groups_changed.append(before.display_name)
    unmanaged_groups = [
        AtlassianGroup(scim_id, resource.get("displayName") or "", resource.get("externalId") or "",
                       tuple(member["value"] for member in resource.get("members") or []))
        for scim_id, resource in by_scim_group.items()
    ]
    return Observation(AppliedState(users, groups, members), unmanaged_users, unmanaged_groups, foreign,
                       gone_users, gone_groups, drift, complete, frozenset(names_read))
