"""Observe Atlassian (first runs, full reads, after an interrupted observing run): list its users
and groups, so the plan adopts what exists and restores what people changed by hand. A delta run
looks up only the few objects its plan needs a fact about."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from guardsync.observe import Observation, observe, observe_some
from guardsync.models import AppliedState, DesiredUser, name_key
from guardsync.scim import ScimClient
from guardsync.summary import markdown_table
from guardsync.text import md, plain
from tasks.common import PERSISTED, transient_only

MAX_ROWS = 500  # attribute edits the drift artifact lists; the summary counts them all


@task(name="observe", **PERSISTED, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def observe_atlassian(scim: ScimClient, recorded: AppliedState) -> Observation:
    observation = observe(recorded, list(scim.iter_users()), list(scim.iter_groups()))
    logger = get_run_logger()
    logger.info("Atlassian holds %d managed users and %d managed groups, %d other accounts and %d other groups",
                len(observation.applied.users), len(observation.applied.groups),
                len(observation.unmanaged_users), len(observation.unmanaged_groups))
    if recorded.users or recorded.groups:
        lines = observation.drift.lines()
        for line in lines:
            logger.warning("drift: %s; this run restores it", plain(line))
        markdown = "# Drift in Atlassian\n\n" + "\n".join(f"- {md(line)}" for line in lines or ["no managed object was changed by hand"])
        if rows := observation.drift.edit_rows():  # which attribute was edited by hand, and how
            markdown += "\n\n## Attributes edited by hand (restored to what guardsync wrote)\n\n" + "\n".join(
                markdown_table(list(rows[0]), [list(row.values()) for row in rows[:MAX_ROWS]]))
        create_markdown_artifact(key="drift", description="Managed objects changed by hand, restored by this run",
                                 markdown=markdown)
    return observation


@task(name="look-up", **PERSISTED, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def look_up_atlassian(scim: ScimClient, recorded: AppliedState, users: list[DesiredUser]) -> Observation:
    """A delta run's one fact (guardsync.plan.facts_needed): the accounts of these disabled users, if any,
    found as the planner adopts (by userName, else externalId); the plan sees them as a full read would."""
    found = {}
    for user in users:
        if (account := scim.find_account(user)) is not None:
            found[account["id"]] = account
    get_run_logger().info("looked up %d disabled users that have no account on record: %d accounts found",
                          len(users), len(found))
    return observe_some(recorded, list(found.values()), [], names_read=frozenset(name_key(u.user_name) for u in users))
