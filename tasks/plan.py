"""Stage 5: the plan (a pure diff) and the guards that must pass before any write."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from guardsync.access import AccessPlan
from guardsync.config import SyncSettings
from guardsync.diff import plan_row_count, plan_rows
from guardsync.guards import empty_scope, managed_active_users, too_many_deprovisions
from guardsync.load import Loader
from guardsync.observe import Observation
from guardsync.changes import Hold, Plan
from guardsync.models import AppliedState, DesiredUser
from guardsync.plan import PlanInputs
from guardsync.scim import ScimClient
from guardsync.state import StateStore
from guardsync.text import md, md_rows
from guardsync.validate import Validated
from tasks.common import PERSISTED, RECOMPUTED

MAX_ROWS = 500  # the artifact table shows the first changes; the counts cover all of them


@task(name="plan", **PERSISTED)
def plan_changes(validated: Validated, recorded: AppliedState, observation: Observation | None, sync: SyncSettings,
                 allow_mass_deactivation: bool, first_run: bool | None = None) -> Plan:
    """`recorded` is the state store's record; `observation` what Atlassian holds (all of it on first runs and
    full reads; on delta runs, the few objects looked up: guardsync.plan.facts_needed).
    `first_run`: no sync of this store has completed yet (a first run, or the re-run of one that stopped
    midway); by default, an empty record."""
    plan = PlanInputs.of(validated).plan(recorded, observation)
    applied = observation.applied if observation is not None else recorded
    publish_plan(plan, validated, recorded, observation)
    active_in_scope = sum(1 for user in validated.users.values() if user.active)
    if first_run is None:
        first_run = not recorded.users and not recorded.groups
    managed_active = managed_active_users(applied, plan, first_run)
    if blocked := empty_scope(active_in_scope, applied):
        raise blocked
    # A person may approve past this one: the plan is held for them (the flow, tasks/approval.py) or the run stops
    if blocked := too_many_deprovisions(plan, managed_active, sync, allow_mass_deactivation):
        plan.holds.append(Hold.of(blocked))
    get_run_logger().info("plan: %s", {k: v for k, v in plan.counts().items() if v} or "no change")
    return plan


@task(name="foresee", **RECOMPUTED)
def foresee_writes(scim: ScimClient, store: StateStore, validated: Validated, plan: Plan, granted: list[str],
                   looked_up: list[DesiredUser], concurrency: int = 4) -> Plan | None:
    """A dry run of a plan made from the record (a delta run): the sync learns what was changed by hand in
    Atlassian when a write meets 404 or 409, and plans that again; the dry run reads those objects instead
    (guardsync.load.Loader.foresee), so it shows what the sync will do. None: nothing found that changes the plan."""
    foreseen = Loader(scim, store, "dry-run", PlanInputs.of(validated), concurrency).foresee(plan, granted, looked_up)
    if foreseen is plan:
        return None
    publish_plan(foreseen, validated, store.load(), None)  # the artifacts show the plan the dry run shows
    get_run_logger().info("the objects this run writes were read as the sync's writes would find them: plan %s",
                          {k: v for k, v in foreseen.counts().items() if v} or "no change")
    return foreseen


def publish_plan(plan: Plan, validated: Validated, recorded: AppliedState, observation: Observation | None,
                 access: AccessPlan | None = None) -> None:
    """The `plan` and `plan-changes` artifacts; with [access], published again by plan-access with the product access."""
    counts = plan.counts() | (access.counts() if access is not None else {})
    lines = ["# Plan", "", "| change | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    if access is not None:
        lines += ["", "## Product access", ""] + [f"- {md(line)}" for line in access.lines(granting=bool(access.grants))]
    create_markdown_artifact(key="plan", markdown="\n".join(lines), description="What this run changes in Atlassian")
    rows = plan_rows(plan, validated, recorded, observation, limit=MAX_ROWS)
    if access is not None:
        rows += [{"object": "access", "change": change, "name": grant.group_name, "detail": grant.product}
                 for change, grants in (("grant", access.grants), ("revoke", access.revokes)) for grant in grants]
        rows += [{"object": "seats", "change": "gain/lose", "name": product,
                  "detail": f"+{seats.gain} -{seats.lose} synced users (grants +{seats.grants} -{seats.revokes})"}
                 for product, seats in sorted(access.seats.items())]
    if rows:
        create_table_artifact(key="plan-changes", table=md_rows(rows),
                              description=f"First {len(rows)} of {plan_row_count(plan)} planned changes")
