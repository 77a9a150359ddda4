"""Product access ([access]): plan-access (observe, plan, gate, guards; before any write) and load-access."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from guardsync.access import AccessPlan, gate_frame, make_access_plan, over_capacity, too_many_revocations
from guardsync.access_load import AccessLoader, observe_access
from guardsync.admin import AdminClient
from guardsync.config import AccessSettings
from guardsync.errors import GuardsyncBlocked
from guardsync.gates import blocked_message, run_gate
from guardsync.observe import Observation
from guardsync.changes import Hold, Plan
from guardsync.models import AppliedState
from guardsync.text import plain
from guardsync.validate import Validated
from tasks.common import PERSISTED, transient_only
from tasks.load import LOAD_OPTIONS
from tasks.plan import publish_plan

ACCESS_GATE_KEYS = ("group_id", "workspace_id")


@task(name="plan-access", **PERSISTED, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def plan_access(admin: AdminClient, access: AccessSettings, validated: Validated, recorded: AppliedState,
                observation: Observation | None, plan: Plan, ledger: dict[tuple[str, str], str]) -> AccessPlan:
    """Resolve the products (config errors stop the run here), observe the groups' grants, plan, gate, guard.
    `ledger`: the maker of each grant the state store knows of."""
    applied = observation.applied if observation is not None else recorded
    group_kinds = {change.group_id: change.kind for change in plan.groups}
    seen = observe_access(admin, access, validated, applied, ledger, group_kinds)
    access_plan = make_access_plan(
        seen.desired, seen.observed, ledger, group_kinds,
        names={gid: group.display_name for gid, group in validated.groups.items()},
        workspaces=seen.workspaces,
        members_before=applied.members,
        members_after={gid: group.members for gid, group in validated.groups.items()},
        frozen_groups=validated.frozen_groups,
        org_ids=seen.org_ids,
        notes=seen.notes,
    )
    publish_plan(plan, validated, recorded, observation, access_plan)
    gate = run_gate("access", gate_frame(access_plan), key_columns=ACCESS_GATE_KEYS)
    if gate.blocking:
        raise GuardsyncBlocked(gate.blocking[0].rule, blocked_message(gate), "")
    for blocked in (too_many_revocations(access_plan, access.max_revocations), over_capacity(access_plan, seen.workspaces)):
        if blocked:  # approvable: the plan is held for a person (tasks/approval.py), or the run stops
            access_plan.holds.append(Hold.of(blocked))
    logger = get_run_logger()
    for note in access_plan.notes:
        logger.warning("%s", plain(note))
    logger.info("access plan: %s", plain("; ".join(access_plan.seat_lines(granting=bool(access_plan.grants)))) or "no change")
    return access_plan


@task(name="load-access", **LOAD_OPTIONS)
def load_access(loader: AccessLoader) -> dict:
    """Grants (the renamed groups' were made in load-groups), revocations, and records of grants that are gone."""
    loader.load()  # its report also holds what the rename hook granted during load-groups
    lines = [f"- {key.replace('_', ' ')}: {value}" for key, value in sorted(loader.report.counts.items())] or ["- no change"]
    create_markdown_artifact(key="load-access", markdown="# Product access\n\n" + "\n".join(lines),
                             description="Grants and revocations this run made")
    return {"counts": dict(loader.report.counts), "failures": list(loader.report.failures)}
