"""What a change does, for people: the attributes an update changes, old -> new, and the plan as rows.

Attributes are named and valued as Atlassian holds them: both sides go through the SCIM
client's own `user_resource` (the body every user write sends), so an attribute added to
DesiredUser and to that body shows up here with nothing to change. A field that differs but
reaches no SCIM attribute is still named, by its DesiredUser field name. Secrets never:
SCIM's `password` (RFC 7643 §4.1.1, never returned) is only said to change, with no value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from itertools import islice
from typing import TYPE_CHECKING, Iterator

from guardsync.models import DesiredUser, account_name
from guardsync.plan import AppliedState, Plan, UserChange
from guardsync.scim import user_resource

if TYPE_CHECKING:  # annotations only: observe sits above this module (its drift report uses hand_edits)
    from guardsync.observe import Observation
    from guardsync.validate import Validated

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


def plan_rows(plan: Plan, validated: Validated, recorded: AppliedState, observation: Observation | None,
              limit: int | None = None) -> list[dict]:
    """The first `limit` of the plan's changes for people, as the `plan-changes` artifact and the dry run
    show them: object, change, name, detail (an update's attributes old -> new, a hand-over, a group's
    members added and removed). `recorded` and `observation` are what the plan was made against."""
    return list(islice(_rows(plan, validated, recorded, observation), limit))


def _rows(plan: Plan, validated: Validated, recorded: AppliedState, observation: Observation | None) -> Iterator[dict]:
    managed = {**recorded.users, **(observation.applied.users if observation is not None else {})}
    held = {user.scim_id: user.record for user in managed.values()}  # each account as Atlassian holds it
    if observation is not None:
        held.update((account.scim_id, account.record) for account in observation.unmanaged_users)
    for change in plan.users:
        before = held.get(change.scim_id) if change.scim_id else None
        parts = [f"account of Entra user {change.handed_from}"] if change.handed_from else []
        if before is not None:
            parts.append(describe(user_changes(before, change.user)))
        yield {"object": "user", "change": user_change_label(change), "name": change.user.user_name,
               "detail": "; ".join(part for part in parts if part)}
    for change in plan.groups:
        yield {"object": "group", "change": change.kind, "name": change.display_name, "detail": ""}
    names = {uid: user.user_name for uid, user in validated.users.items()}
    names.update({uid: user.record.user_name for uid, user in managed.items()})
    for user_id in plan.forget_users:
        yield {"object": "user", "change": "gone", "name": names.get(user_id, user_id),
               "detail": "deleted by hand in Atlassian; not re-created"}
    for group_id, scim_ids in plan.foreign.items():
        group = validated.groups.get(group_id)
        yield {"object": "members", "change": "remove", "name": group.display_name if group else group_id,
               "detail": f"-{len(scim_ids)} accounts guardsync does not manage"}
    for change in plan.members:
        group = validated.groups.get(change.group_id)
        shown = [f"+{names.get(u, u)}" for u in change.add[:5]] + [f"-{names.get(u, u)}" for u in change.remove[:5]]
        yield {"object": "members", "change": "add/remove", "name": group.display_name if group else change.group_id,
               "detail": f"+{len(change.add)} -{len(change.remove)}: " + ", ".join(shown)}


def user_change_label(change: UserChange) -> str:
    """'adopt', 'adopt+deactivate', 'update (hand-over)', ...: what the plan-changes row says."""
    if change.adopted and change.kind != "adopt":
        return f"adopt+{change.kind}"
    return f"{change.kind} (hand-over)" if change.handed_from else change.kind


def plan_row_count(plan: Plan) -> int:
    """How many rows `plan_rows` gives without a limit."""
    return len(plan.users) + len(plan.groups) + len(plan.forget_users) + len(plan.foreign) + len(plan.members)
