"""Stage 5: the plan (a pure diff) and the guards that must pass before any write."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from guardsync.config import SyncSettings
from guardsync.guards import empty_scope, managed_active_users, too_many_deprovisions
from guardsync.observe import Observation
from guardsync.plan import AppliedState, Plan, make_plan
from guardsync.validate import Validated
from tasks.common import PERSISTED

MAX_ROWS = 500  # the artifact table shows the first changes; the counts cover all of them


@task(name="plan", **PERSISTED)
def plan_changes(validated: Validated, recorded: AppliedState, observation: Observation | None, sync: SyncSettings,
                 allow_mass_deactivation: bool) -> Plan:
    """`recorded` is the state store's record; `observation` (first runs, full reads) what Atlassian holds."""
    plan = make_plan(validated.users, validated.groups, recorded, validated.frozen_users, validated.frozen_groups,
                     observation)
    applied = observation.applied if observation is not None else recorded
    publish_plan(plan, validated, AppliedState({**recorded.users, **applied.users}))
    active_in_scope = sum(1 for user in validated.users.values() if user.active)
    first_run = not recorded.users and not recorded.groups
    managed_active = managed_active_users(applied, plan, first_run)
    for blocked in (empty_scope(active_in_scope, applied),
                    too_many_deprovisions(plan, managed_active, sync, allow_mass_deactivation)):
        if blocked:
            raise blocked
    get_run_logger().info("plan: %s", {k: v for k, v in plan.counts().items() if v} or "no change")
    return plan


def publish_plan(plan: Plan, validated: Validated, applied: AppliedState) -> None:
    counts = plan.counts()
    lines = ["# Plan", "", "| change | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    create_markdown_artifact(key="plan", markdown="\n".join(lines), description="What this run changes in Atlassian")
    names = {uid: user.user_name for uid, user in validated.users.items()}
    names.update({uid: user.record.user_name for uid, user in applied.users.items()})
    rows = [{"object": "user", "change": user_change_label(c), "name": c.user.user_name,
             "detail": f"account of Entra user {c.handed_from}" if c.handed_from else ""} for c in plan.users]
    rows += [{"object": "group", "change": c.kind, "name": c.display_name, "detail": ""} for c in plan.groups]
    rows += [{"object": "user", "change": "gone", "name": names.get(u, u), "detail": "deleted by hand in Atlassian; not re-created"}
             for u in plan.forget_users]
    for group_id, scim_ids in plan.foreign.items():
        group = validated.groups.get(group_id)
        rows.append({"object": "members", "change": "remove", "name": group.display_name if group else group_id,
                     "detail": f"-{len(scim_ids)} accounts guardsync does not manage"})
    for change in plan.members:
        group = validated.groups.get(change.group_id)
        label = group.display_name if group else change.group_id
        rows.append({"object": "members", "change": "add/remove", "name": label,
                     "detail": f"+{len(change.add)} -{len(change.remove)}: "
                               + ", ".join([f"+{names.get(u, u)}" for u in change.add[:5]] + [f"-{names.get(u, u)}" for u in change.remove[:5]])})
    if rows:
        create_table_artifact(key="plan-changes", table=rows[:MAX_ROWS],
                              description=f"First {min(len(rows), MAX_ROWS)} of {len(rows)} planned changes")


def user_change_label(change) -> str:
    """'adopt', 'adopt+deactivate', 'update (hand-over)', ...: what the plan-changes row says."""
    if change.adopted and change.kind != "adopt":
        return f"adopt+{change.kind}"
    return f"{change.kind} (hand-over)" if change.handed_from else change.kind
