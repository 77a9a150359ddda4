"""Stage 5: the plan (a pure diff) and the guards that must pass before any write."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from guardsync.config import SyncSettings
from guardsync.diff import plan_row_count, plan_rows
from guardsync.guards import empty_scope, managed_active_users, too_many_deprovisions
from guardsync.observe import Observation
from guardsync.plan import AppliedState, Plan, make_plan
from guardsync.validate import Validated
from tasks.common import PER_RUN

MAX_ROWS = 500  # the artifact table shows the first changes; the counts cover all of them


@task(name="plan", cache_policy=PER_RUN, persist_result=True)
def plan_changes(validated: Validated, recorded: AppliedState, observation: Observation | None, sync: SyncSettings,
                 allow_mass_deactivation: bool) -> Plan:
    """`recorded` is the state store's record; `observation` (first runs, full reads) what Atlassian holds."""
    plan = make_plan(validated.users, validated.groups, recorded, validated.frozen_users, validated.frozen_groups,
                     observation)
    applied = observation.applied if observation is not None else recorded
    publish_plan(plan, validated, recorded, observation)
    active_in_scope = sum(1 for user in validated.users.values() if user.active)
    first_run = not recorded.users and not recorded.groups
    managed_active = managed_active_users(applied, plan, first_run)
    for blocked in (empty_scope(active_in_scope, applied),
                    too_many_deprovisions(plan, managed_active, sync, allow_mass_deactivation)):
        if blocked:
            raise blocked
    get_run_logger().info("plan: %s", {k: v for k, v in plan.counts().items() if v} or "no change")
    return plan


def publish_plan(plan: Plan, validated: Validated, recorded: AppliedState, observation: Observation | None) -> None:
    counts = plan.counts()
    lines = ["# Plan", "", "| change | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    create_markdown_artifact(key="plan", markdown="\n".join(lines), description="What this run changes in Atlassian")
    rows = plan_rows(plan, validated, recorded, observation, limit=MAX_ROWS)
    if rows:
        create_table_artifact(key="plan-changes", table=rows,
                              description=f"First {len(rows)} of {plan_row_count(plan)} planned changes")
