"""The plan: a pure diff of the desired state against Atlassian as last observed.

"As last observed" is the state store's record of what guardsync applied, corrected, on
first runs and full reads, by an Observation of what Atlassian really holds
(guardsync.observe). With an observation the plan also adopts what already exists: an
unmanaged account with the user's userName (case-insensitive; else with the Entra id as
externalId), an unmanaged group with the group's displayName; it never takes over an
object guardsync manages for another Entra id.

Quarantined users and groups are frozen: nothing about them changes this run,
including their memberships. Users are never deleted, only deactivated. A renamed
group is re-created under its new name, since Atlassian refuses renames.

Names pass from one object to another within a run: an identifier given up by a managed
user (deleted, out of scope or renamed in Entra) and taken by another Entra user hands
the account over (Atlassian keys accounts by email); a group name given up by a managed
group (renamed or deleted) is taken by a new group only after it is freed. Each change
carries its `wave`: the loader runs wave 0, then wave 1, ..., so that a change that takes
a name runs after the change that frees it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, TypeVar

from guardsync.changes import GroupChange, HandOver, MemberChange, Plan, UserChange, UserKind
from guardsync.models import (AppliedGroup, AppliedState, AppliedUser, DesiredGroup, DesiredUser, account_name, name_key,
                              own_name)
from guardsync.observe import AtlassianUser, Observation

if TYPE_CHECKING:
    from guardsync.validate import Validated

# == users ==========================================================================================


def _active_kind(was_active: bool, is_active: bool, otherwise: UserKind) -> UserKind:
    if was_active and not is_active:
        return "deactivate"
    if is_active and not was_active:
        return "reactivate"
    return otherwise


def plan_users(
    desired: dict[str, DesiredUser], applied: dict[str, AppliedUser], frozen: frozenset[str],
    observation: Observation | None = None,
) -> tuple[list[UserChange], list[HandOver], list[DesiredUser], int]:
    """(changes, hand-overs, disabled users not created, active accounts adopted); see the module docstring."""
    holder = {name_key(account_name(u.record)): uid for uid, u in applied.items()}
    handovers: dict[str, HandOver] = {}  # by the Entra id that gives its account up
    for user_id, user in desired.items():
        previous = holder.get(name_key(user.user_name))
        if previous is None or previous == user_id or previous in frozen or previous in handovers:
            continue
        # A new user takes the account of one who left or was renamed; a managed user renamed to the
        # identifier of one who left takes that account too (a deactivated account keeps its userName).
        if (user_id not in applied and _gives_up(previous, user, desired)) or (user_id in applied and previous not in desired):
            handovers[previous] = HandOver(user.user_name, previous, user_id)

    changes: list[UserChange] = []
    adoptable = _Adoptable(observation)
    taken_over = {h.to_id: applied[h.from_id] for h in handovers.values()}
    unplaced = []
    not_created = []
    adopted_active = 0
    for user_id, user in desired.items():
        before = taken_over.get(user_id) or (applied.get(user_id) if user_id not in handovers else None)
        found = None
        if before is not None and user_id not in taken_over and name_key(account_name(before.record)) != name_key(user.user_name):
            # Renamed onto an identifier an account guardsync does not manage holds: Atlassian keys accounts by
            # email, so that account is the user's now (adopted, as on a first run) and its own is let go.
            found = adoptable.take(user, by_external_id=False)
        if found is not None:
            changes.append(_adoption(user, found))
            adopted_active += found.record.active
        elif before is None:
            unplaced.append(user)  # new, or renamed with its old identifier gone to someone else
        elif before.record != user:
            kind = _active_kind(before.record.active, user.active, "update")
            changes.append(UserChange(kind, user, before.scim_id, handed_from=_from(handovers, user_id)))
        own = applied.get(user_id)
        if (user_id in taken_over or found is not None) and own is not None and user_id not in handovers:
            # Its old account (its old identifier) is nobody's now: deactivated, its externalId cleared (no
            # two accounts carry one Entra id), no longer recorded; handed_from names whose it was.
            changes.append(UserChange("deactivate" if own.record.active else "update",
                                      replace(own_name(own.record), active=False, external_id=""), own.scim_id,
                                      handed_from=user_id, release=True))
    for user in unplaced:
        found = adoptable.take(user)
        if found is not None:
            changes.append(_adoption(user, found))
            adopted_active += found.record.active
        elif user.active:
            changes.append(UserChange("create", user))
        else:
            not_created.append(user)  # a disabled user with no account in Atlassian is not created
    for user_id, before in applied.items():
        if user_id not in desired and user_id not in frozen and user_id not in handovers and before.record.active:
            # Left scope (or was deleted in Entra): deactivate, never delete; what Atlassian holds stays,
            # but never an observed `userName <email>` (Atlassian refuses it as a userName).
            changes.append(UserChange("deactivate", replace(own_name(before.record), active=False), before.scim_id))
    return _in_waves(changes, _user_takes, _user_frees(applied)), list(handovers.values()), not_created, adopted_active


def _adoption(user: DesiredUser, found: AtlassianUser) -> UserChange:
    kind = _active_kind(found.record.active, user.active, "adopt")
    return UserChange(kind, user, found.scim_id, write=found.record != user, adopted=True)


def _from(handovers: dict[str, HandOver], user_id: str) -> str | None:
    return next((h.from_id for h in handovers.values() if h.to_id == user_id), None)


def _gives_up(previous: str, user: DesiredUser, desired: dict[str, DesiredUser]) -> bool:
    """Does the managed user `previous` give up the identifier `user` now has (deleted, left scope, renamed)?"""
    still = desired.get(previous)
    return still is None or name_key(still.user_name) != name_key(user.user_name)


class _Adoptable:
    """Unmanaged accounts that a user may take over: by userName first, then by externalId; each once."""

    def __init__(self, observation: Observation | None):
        accounts = observation.unmanaged_users if observation else []
        self.by_name = {name_key(account_name(a.record)): a for a in accounts}
        self.by_external_id = {a.record.external_id: a for a in reversed(accounts) if a.record.external_id}
        self.taken: set[str] = set()

    def take(self, user: DesiredUser, by_external_id: bool = True) -> AtlassianUser | None:
        found = self.by_name.get(name_key(user.user_name))
        if found is None and by_external_id:
            found = self.by_external_id.get(user.external_id)
            if found is not None and name_key(user.user_name) in self.by_name:
                found = None  # its new name is another account's: taking this one would collide
        if found is None or found.scim_id in self.taken:
            return None
        self.taken.add(found.scim_id)
        return found


def _user_takes(change: UserChange) -> str | None:
    return name_key(change.user.user_name)


def _user_frees(applied: dict[str, AppliedUser]) -> Callable[[UserChange], str | None]:
    by_scim = {u.scim_id: u for u in applied.values()}

    def frees(change: UserChange) -> str | None:
        before = by_scim.get(change.scim_id) if change.scim_id else None
        return name_key(account_name(before.record)) if before is not None else None

    return frees


# == groups =========================================================================================


def plan_groups(
    desired: dict[str, DesiredGroup], applied: dict[str, AppliedGroup], frozen: frozenset[str],
    observation: Observation | None = None, scim_to_user: dict[str, str] | None = None,
) -> tuple[list[GroupChange], dict[str, tuple[str, ...]]]:
    """(changes, foreign members of adopted groups). A group that needs a name (new, or renamed) an unmanaged
    group holds takes that group over (adopted; a renamed one's old group then goes), unless a managed group
    holds that name (then it is freed first, and the group created)."""
    changes = []
    held = {name_key(g.display_name) for g in applied.values()}
    unmanaged = {name_key(g.display_name): g for g in (observation.unmanaged_groups if observation else [])}
    ours = scim_to_user or {}
    foreign: dict[str, tuple[str, ...]] = {}
    for group_id, group in desired.items():
        before = applied.get(group_id)
        if group_id in frozen:
            continue
        key = name_key(group.display_name)
        if before is not None and name_key(before.display_name) == key:
            continue
        kind = "rename" if before is not None else "create"
        found = unmanaged.pop(key, None) if key not in held else None
        if found is None:
            changes.append(GroupChange(kind, group_id, group.display_name))
            continue
        changes.append(GroupChange("adopt" if kind == "create" else "rename", group_id, found.display_name,
                                   found.scim_id, frozenset(ours[s] for s in found.members if s in ours)))
        if outside := tuple(s for s in found.members if s not in ours):
            foreign[group_id] = outside
    for group_id, before in applied.items():
        if group_id not in desired and group_id not in frozen:
            changes.append(GroupChange("delete", group_id, before.display_name))
    by_id = dict(applied)
    takes = lambda c: name_key(c.display_name) if c.kind in ("create", "rename") else None  # noqa: E731
    frees = lambda c: name_key(by_id[c.group_id].display_name) if c.kind in ("rename", "delete") else None  # noqa: E731
    return _in_waves(changes, takes, frees), foreign


def plan_members(
    desired: dict[str, DesiredGroup],
    applied: AppliedState,
    group_changes: list[GroupChange],
    frozen_users: frozenset[str],
    frozen_groups: frozenset[str],
) -> list[MemberChange]:
    recreated = {c.group_id for c in group_changes if c.kind in ("create", "rename") and not c.takes_existing}
    adopted = {c.group_id: c.members for c in group_changes if c.takes_existing}
    renamed = {c.group_id for c in group_changes if c.kind == "rename"}
    changes = []
    for group_id, group in desired.items():
        if group_id in frozen_groups:
            continue
        recorded = applied.members.get(group_id, frozenset())
        carried = recorded & frozen_users if group_id in renamed else frozenset()  # a renamed group's frozen members go along
        before = adopted.get(group_id, recorded)
        target = group.members - frozen_users
        if group_id in recreated:  # starts empty
            current, target = frozenset(), target | carried
        else:
            current = before - frozen_users
            target = target | (carried - before)
        add, remove = target - current, current - target
        if add or remove:
            changes.append(MemberChange(group_id, tuple(sorted(add)), tuple(sorted(remove))))
    return changes


# == the whole plan =================================================================================


def make_plan(
    users: dict[str, DesiredUser],
    groups: dict[str, DesiredGroup],
    applied: AppliedState,
    frozen_users: frozenset[str] = frozenset(),
    frozen_groups: frozenset[str] = frozenset(),
    observation: Observation | None = None,
    frozen_names: frozenset[str] = frozenset(),
) -> Plan:
    """`applied` is the state store's record; with an `observation` of Atlassian, what Atlassian holds wins.
    `frozen_names`: the identifiers (name_key) of frozen users, whose unmanaged accounts keep their groups."""
    foreign: dict[str, tuple[str, ...]] = {}
    forget_users: list[str] = []
    forget_groups: list[str] = []
    observed_users: dict[str, AppliedUser] = {}
    observed_members: dict[str, frozenset[str]] = {}
    if observation is not None:
        recorded, applied = applied, observation.applied
        # An account whose externalId is not its user's (edited by hand, a hand-over or release cut short) is left
        # to the plan's own write: the store keys a record by the externalId it holds.
        observed_users = {uid: user for uid, user in applied.users.items()
                          if recorded.users.get(uid) != user and user.record.external_id == uid}
        observed_members = {gid: held for gid, held in applied.members.items()
                            if gid in recorded.groups and recorded.members.get(gid, frozenset()) != held}
        forget_users = [u for u in observation.gone_users if u not in frozen_users and not (u in users and users[u].active)]
        forget_groups = [g for g in observation.gone_groups if g not in groups and g not in frozen_groups]
        foreign = dict(observation.foreign_members)
    user_changes, handovers, not_created, adopted_active = plan_users(users, applied.users, frozen_users, observation)
    no_account = {user.external_id: user.user_name for user in not_created if observation is not None
                  and (observation.complete or name_key(user.user_name) in observation.names_read)}

    # Who holds which account once the users load is done: hand-overs and adoptions included.
    owner = {u.scim_id: uid for uid, u in applied.users.items()}
    owner.update({c.scim_id: c.user.external_id for c in user_changes if c.scim_id and not c.release})
    released = {c.scim_id for c in user_changes if c.release}
    members: dict[str, frozenset[str]] = {}
    for group_id, member_ids in applied.members.items():
        scim_of = {u: applied.users[u].scim_id for u in member_ids if u in applied.users}
        members[group_id] = frozenset(owner.get(scim_of[u], u) if u in scim_of else u
                                      for u in member_ids if scim_of.get(u) not in released)
        if left := tuple(s for s in scim_of.values() if s in released):  # released accounts leave the groups
            foreign[group_id] = foreign.get(group_id, ()) + left
    for scim_id in released:
        owner.pop(scim_id, None)
    for group_id, scim_ids in list(foreign.items()):  # members who were unmanaged accounts, adopted this run
        members[group_id] = members.get(group_id, frozenset()) | {owner[s] for s in scim_ids if s in owner}
        if rest := tuple(s for s in scim_ids if s not in owner):
            foreign[group_id] = rest
        else:
            del foreign[group_id]
    for group_id in frozen_groups:
        foreign.pop(group_id, None)  # frozen: its members stay as they are
    mapped = AppliedState(applied.users, applied.groups, members)

    group_changes, adopted_foreign = plan_groups(groups, applied.groups, frozen_groups, observation, owner)
    foreign.update(adopted_foreign)
    foreign = _not_frozen(foreign, observation, frozen_names)
    member_changes = plan_members(groups, mapped, group_changes, frozen_users, frozen_groups)
    return Plan(user_changes, group_changes, member_changes, foreign, forget_users, forget_groups, handovers,
                len(not_created), adopted_active, no_account, observation is not None and observation.complete,
                observed_users=observed_users, observed_members=observed_members)


def _not_frozen(foreign: dict[str, tuple[str, ...]], observation: Observation | None,
                frozen_names: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """Foreign members less the unmanaged accounts of frozen users: their memberships stay as they are."""
    if not frozen_names or observation is None:
        return foreign
    frozen = {a.scim_id for a in observation.unmanaged_users if name_key(account_name(a.record)) in frozen_names}
    kept = {gid: tuple(s for s in scim_ids if s not in frozen) for gid, scim_ids in foreign.items()}
    return {gid: scim_ids for gid, scim_ids in kept.items() if scim_ids}


def facts_needed(users: dict[str, DesiredUser], applied: AppliedState, no_account: dict[str, str]) -> list[DesiredUser]:
    """What a delta plan cannot know from the record: whether a disabled user it holds no account for has one
    in Atlassian (made by hand, or by another sync). A full read would adopt and deactivate it; a delta run
    looks up these users, each once: those seen without an account are kept (Plan.no_account)."""
    return [user for user_id, user in users.items()
            if not user.active and user_id not in applied.users
            and name_key(no_account.get(user_id, "")) != name_key(user.user_name)]


@dataclass(frozen=True)
class PlanInputs:
    """What the plan is made from besides Atlassian: the desired state and who is frozen. The loader keeps it
    to plan again the objects a write met 404 or 409 on, with what it read of them (one planner)."""

    users: dict[str, DesiredUser]
    groups: dict[str, DesiredGroup]
    frozen_users: frozenset[str] = frozenset()
    frozen_groups: frozenset[str] = frozenset()
    frozen_names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, validated: Validated) -> PlanInputs:
        return cls(validated.users, validated.groups, validated.frozen_users, validated.frozen_groups,
                   validated.frozen_names)

    def plan(self, applied: AppliedState, observation: Observation | None = None) -> Plan:
        return make_plan(self.users, self.groups, applied, self.frozen_users, self.frozen_groups, observation,
                         self.frozen_names)


Change = TypeVar("Change", UserChange, GroupChange)


def _in_waves(changes: list[Change], takes: Callable[[Change], str | None],
              frees: Callable[[Change], str | None]) -> list[Change]:
    """Each change with the wave it runs in: one after the change that frees the name it takes.

    A cycle of names (A renamed to B and B to A in one round) cannot be ordered: its changes go
    in the last wave, where Atlassian's 409 reports them.
    """
    freed_by = {}
    for index, change in enumerate(changes):
        if (name := frees(change)) is not None:
            freed_by[name] = index
    waves: dict[int, int] = {}

    def wave(index: int, path: frozenset[int]) -> int:
        if index in waves:
            return waves[index]
        name = takes(changes[index])
        blocker = freed_by.get(name) if name is not None else None
        if blocker is None or blocker == index:
            result = 0
        elif blocker in path:
            result = len(changes)  # a cycle
        else:
            result = wave(blocker, path | {index}) + 1
        waves[index] = result
        return result

    for index in range(len(changes)):
        wave(index, frozenset())
    return [replace(change, wave=waves[index]) if waves[index] else change for index, change in enumerate(changes)]


def apply_plan(applied: AppliedState, plan: Plan) -> AppliedState:
    """The state a fully successful load of `plan` leaves (used by the property tests)."""
    users = {uid: u for uid, u in applied.users.items() if uid not in plan.forget_users}
    members = {gid: m - set(plan.forget_users) for gid, m in applied.members.items() if gid not in plan.forget_groups}
    for handover in plan.handovers:
        users.pop(handover.from_id, None)
        members = {gid: frozenset(handover.to_id if u == handover.from_id else u for u in m) for gid, m in members.items()}
    for change in plan.users:
        if not change.release:
            users[change.user.external_id] = AppliedUser(change.scim_id or f"new-{change.user.external_id}", change.user)
    groups = {gid: g for gid, g in applied.groups.items() if gid not in plan.forget_groups}
    for change in plan.groups:
        if change.kind == "delete":
            groups.pop(change.group_id, None)
            members.pop(change.group_id, None)
        elif change.kind == "adopt":
            groups[change.group_id] = AppliedGroup(change.scim_id, change.display_name)
            members[change.group_id] = change.members
        else:
            groups[change.group_id] = AppliedGroup("new", change.display_name)
            members[change.group_id] = frozenset()
    for change in plan.members:
        current = members.get(change.group_id, frozenset())
        members[change.group_id] = (current | set(change.add)) - set(change.remove)
    return AppliedState(users, groups, members)
