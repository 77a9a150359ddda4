"""What a change is: the plan's changes (users, groups, memberships, hand-overs) and, attribute by attribute,
what writing one record over another changes in Atlassian.

Attributes are named and valued as Atlassian holds them: both sides go through the SCIM
client's own `user_resource` (the body every user write sends), so an attribute added to
DesiredUser and to that body shows up here with nothing to change. A field that differs but
reaches no SCIM attribute is still named, by its DesiredUser field name. Secrets never:
SCIM's `password` (RFC 7643 §4.1.1, never returned) is only said to change, with no value.

Below observe (whose drift report uses hand_edits), plan (which makes these changes) and diff
(which shows them to people): it imports none of them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Literal

from guardsync.errors import GuardsyncBlocked
from guardsync.models import AppliedUser, DesiredUser, account_name
from guardsync.scim import user_resource

UserKind = Literal["create", "update", "deactivate", "reactivate", "adopt"]
GroupKind = Literal["create", "delete", "rename", "adopt"]
PAST = {"create": "created", "update": "updated", "deactivate": "deactivated", "reactivate": "reactivated",
        "adopt": "adopted", "rename": "renamed", "delete": "deleted"}


# == the plan's changes ===============================================================================


@dataclass(frozen=True)
class UserChange:
    kind: UserKind
    user: DesiredUser  # the record to write
    scim_id: str | None = None  # the account written; None: a new account (POST)
    write: bool = True  # False: an adopted account that already holds exactly this record (recorded only)
    adopted: bool = False  # an account guardsync did not manage before this run
    handed_from: str | None = None  # the Entra id whose account this was (its identifier passed to this user)
    release: bool = False  # the user's old account, left behind for one it took over: deactivated, no longer its
    wave: int = 0

    def count_keys(self) -> list[str]:
        """The summary counts this change adds to (the dry run and the sync count alike)."""
        keys = [f"users_{PAST[self.kind]}"]
        if self.adopted and self.kind != "adopt":
            keys.append("users_adopted")  # adopted and deactivated (or reactivated) in one write
        return keys


@dataclass(frozen=True)
class GroupChange:
    kind: GroupKind
    group_id: str
    display_name: str  # the new name for create/rename, the current one for delete and adopt
    scim_id: str | None = None  # adopt, and a rename onto a group that holds the new name: the existing group
    members: frozenset[str] = frozenset()  # with scim_id: the user ids it holds already (after the users load)
    wave: int = 0

    @property
    def takes_existing(self) -> bool:
        """The group takes over a group Atlassian holds (adopted) instead of creating one."""
        return self.scim_id is not None and self.kind in ("adopt", "rename")

    def count_keys(self) -> list[str]:
        keys = [f"groups_{PAST[self.kind]}"]
        if self.kind == "rename" and self.takes_existing:
            keys.append("groups_adopted")  # renamed onto a group made by hand: adopted too
        return keys


@dataclass(frozen=True)
class MemberChange:
    group_id: str
    add: tuple[str, ...]
    remove: tuple[str, ...]


@dataclass(frozen=True)
class HandOver:
    user_name: str
    from_id: str  # the Entra user that gave the identifier up
    to_id: str  # the Entra user that takes the account

    def line(self) -> str:
        return f"{self.user_name}: the account passes from Entra user {self.from_id} to {self.to_id}"


@dataclass(frozen=True)
class Hold:
    """An approvable guard the plan trips (guardsync.errors.APPROVABLE_RULES): the run holds the plan for a
    person to approve or reject (tasks/approval.py), or stops blocked."""

    rule: str
    message: str
    advice: str

    @classmethod
    def of(cls, blocked: GuardsyncBlocked) -> Hold:
        return cls(blocked.rule, blocked.message, blocked.advice)


def blocked_by(holds: list[Hold], note: str = "") -> GuardsyncBlocked:
    """The error a run held by these guards ends with: every guard's reason, the first one's advice, then `note`."""
    advice = ". ".join(part for part in (holds[0].advice, note) if part)
    return GuardsyncBlocked(holds[0].rule, "; ".join(hold.message for hold in holds), advice)


@dataclass
class Plan:
    users: list[UserChange] = field(default_factory=list)
    groups: list[GroupChange] = field(default_factory=list)
    members: list[MemberChange] = field(default_factory=list)
    foreign: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group id -> SCIM ids of members to remove
    forget_users: list[str] = field(default_factory=list)  # managed accounts deleted by hand whose users left: gone
    forget_groups: list[str] = field(default_factory=list)  # managed groups deleted by hand that left scope
    handovers: list[HandOver] = field(default_factory=list)
    not_created_disabled: int = 0  # disabled users with no account: nothing to do
    adopted_active: int = 0  # active accounts adopted (a first run's deactivation guard counts them)
    # Disabled users Atlassian was seen to hold no account for (Entra id -> identifier): a delta run looks
    # up only the others (guardsync.plan.facts_needed); with no_account_all, every such user of the run.
    no_account: dict[str, str] = field(default_factory=dict)
    no_account_all: bool = False
    holds: list[Hold] = field(default_factory=list)  # approvable guards it trips (not part of what it changes)
    # What Atlassian was seen to hold where the record says otherwise (Entra id -> account; group id -> managed
    # members): a run killed after a write Atlassian applied and before it was recorded, or a hand edit that
    # happens to match. The loader records it before writing, so the changes apply to the record as to Atlassian
    # and a later delta run plans from what is there (without it, a member the record lacks is never removed).
    observed_users: dict[str, AppliedUser] = field(default_factory=dict)
    observed_members: dict[str, frozenset[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        users = Counter(key for change in self.users for key in change.count_keys())
        groups = Counter(key for change in self.groups for key in change.count_keys())
        return {
            "users_created": users["users_created"],
            "users_updated": users["users_updated"],
            "users_deactivated": users["users_deactivated"],
            "users_reactivated": users["users_reactivated"],
            "users_adopted": users["users_adopted"],
            "users_gone": len(self.forget_users),  # deleted by hand, user left: recorded, not written
            "groups_created": groups["groups_created"],
            "groups_renamed": groups["groups_renamed"],
            "groups_deleted": groups["groups_deleted"],
            "groups_adopted": groups["groups_adopted"],
            "members_added": sum(len(change.add) for change in self.members),
            "members_removed": sum(len(change.remove) for change in self.members)
            + sum(len(scim_ids) for scim_ids in self.foreign.values()),
        }

    def is_empty(self) -> bool:
        return not (self.users or self.groups or self.members or self.foreign or self.forget_users or self.forget_groups)

    def deprovisions(self) -> int:
        """Deactivations plus group deletions (renames are not deletions): what the guard counts."""
        counts = self.counts()
        return counts["users_deactivated"] + counts["groups_deleted"]


# == attributes: what a write changes =================================================================

SECRET_ATTRIBUTES = frozenset({"password"})
NOT_ATTRIBUTES = frozenset({"schemas", "id", "meta", "groups"})  # envelope and read-only parts of a resource


@dataclass(frozen=True)
class AttributeChange:
    attribute: str  # as Atlassian names it: userName, name.givenName, emails.work, department, ...
    old: object  # None: not held
    new: object

    @property
    def shown(self) -> tuple[str, str]:
        """Old and new as a person reads them; a secret's are never shown."""
        if self.attribute in SECRET_ATTRIBUTES:
            return "(secret)", "(secret, changed)"
        return _shown(self.old), _shown(self.new)

    def __str__(self) -> str:
        old, new = self.shown
        return f"{self.attribute}: {old} -> {new}"


def _shown(value: object) -> str:
    if value is None or value == "":
        return "(none)"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def flatten_resource(resource: dict) -> dict[str, object]:
    """A SCIM resource as {attribute path: value}: sub-attributes dotted (`name.givenName`), multi-valued
    attributes by their type (`emails.work`, `phoneNumbers.mobile`), extension schemas by attribute name."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if not prefix and (key in NOT_ATTRIBUTES or key.startswith("urn:")):
                    if key.startswith("urn:"):
                        walk("", inner)  # an extension's attributes (department, organization)
                    continue
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                label = item.get("type") or ("primary" if item.get("primary") else str(index))
                flat[f"{prefix}.{label}"] = item.get("value", {k: v for k, v in item.items() if k != "type"})
        else:
            flat[prefix] = value

    walk("", resource)
    return flat


def resource_changes(old: dict[str, object], new: dict[str, object],
                     only: set[str] | None = None) -> list[AttributeChange]:
    """The attributes whose value differs between two flattened resources (restricted to `only` if given)."""
    paths = [path for path in dict.fromkeys([*new, *old]) if only is None or path in only]  # the resource's order
    return [AttributeChange(path, old.get(path), new.get(path)) for path in paths
            if _normal(old.get(path)) != _normal(new.get(path))]


def _normal(value: object) -> object:
    return None if value == "" else value  # Atlassian holds an empty value as no value


def held_resource(record: DesiredUser) -> dict:
    """The SCIM body of a record. A record observed in Atlassian whose email differs from its userName
    carries both as `userName <email>` (guardsync.observe): here they are apart again, as Atlassian holds them."""
    resource = user_resource(record)
    name = account_name(record)
    if name != record.user_name:
        resource["userName"] = name
        resource["emails"] = [{**resource["emails"][0], "value": record.user_name[len(name) + 2:-1]}]
    return resource


def user_changes(before: DesiredUser, after: DesiredUser) -> list[AttributeChange]:
    """What writing `after` over `before` (as Atlassian holds it) changes there."""
    changes = resource_changes(flatten_resource(held_resource(before)), flatten_resource(held_resource(after)))
    if changes or before == after:
        return changes
    return [AttributeChange(f.name, getattr(before, f.name), getattr(after, f.name))
            for f in fields(DesiredUser) if getattr(before, f.name) != getattr(after, f.name)]


def hand_edits(recorded: DesiredUser, held: dict, observed: DesiredUser) -> list[AttributeChange]:
    """Drift: what someone changed by hand, guardsync's last write (`recorded`) -> what Atlassian holds (`held`,
    the raw resource; `observed` is its reading in DesiredUser shape), over the attributes guardsync writes."""
    written = flatten_resource(held_resource(recorded))
    managed = written.keys() | flatten_resource(held_resource(observed)).keys()
    return resource_changes(written, flatten_resource(held), only=managed)


def describe(changes: list[AttributeChange]) -> str:
    return "; ".join(str(change) for change in changes)
