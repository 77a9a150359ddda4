"""The plan for people: each change as a row (object, change, name, detail), an update's attributes
old -> new (guardsync.changes says what they are), a hand-over, a group's members added and removed."""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Iterator

from guardsync.changes import Plan, UserChange, describe, user_changes
from guardsync.models import AppliedState
from guardsync.observe import Observation

if TYPE_CHECKING:
    from guardsync.validate import Validated


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
