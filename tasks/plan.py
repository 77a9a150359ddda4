"""Stage 5: the plan (a pure diff) and the guards that must pass before any write."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from guardsync.config import SyncSettings
from guardsync.guards import empty_scope, too_many_deprovisions
from guardsync.plan import AppliedState, Plan, make_plan
from guardsync.validate import Validated
from tasks.common import PER_RUN

MAX_ROWS = 500  # the artifact table shows the first changes; the counts cover all of them


@task(name="plan", cache_policy=PER_RUN, persist_result=True)
def plan_changes(validated: Validated, applied: AppliedState, sync: SyncSettings, allow_mass_deactivation: bool) -> Plan:
    plan = make_plan(validated.users, validated.groups, applied, validated.frozen_users, validated.frozen_groups)
    publish_plan(plan, validated, applied)
    active_in_scope = sum(1 for user in validated.users.values() if user.active)
    for blocked in (empty_scope(active_in_scope, applied), too_many_deprovisions(plan, applied, sync, allow_mass_deactivation)):
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
    rows = [{"object": "user", "change": c.kind, "name": c.user.user_name, "detail": ""} for c in plan.users]
    rows += [{"object": "group", "change": c.kind, "name": c.display_name, "detail": ""} for c in plan.groups]
    for change in plan.members:
        group = validated.groups.get(change.group_id)
        label = group.display_name if group else change.group_id
        rows.append({"object": "members", "change": "add/remove", "name": label,
                     "detail": f"+{len(change.add)} -{len(change.remove)}: "
                               + ", ".join([f"+{names.get(u, u)}" for u in change.add[:5]] + [f"-{names.get(u, u)}" for u in change.remove[:5]])})
    if rows:
        create_table_artifact(key="plan-changes", table=rows[:MAX_ROWS],
                              description=f"First {min(len(rows), MAX_ROWS)} of {len(rows)} planned changes")
