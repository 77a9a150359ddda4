"""Stage 6: apply the plan to Atlassian, users then groups then memberships.

Each write is recorded in the state store as it succeeds, so a retry of a failed
load (same flow run, the earlier stages cached) skips what is done and finishes the rest.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from guardsync.load import Loader, LoadReport
from guardsync.models import DesiredGroup
from guardsync.plan import Plan
from tasks.common import PER_RUN, transient_only

LOAD_OPTIONS = dict(cache_policy=PER_RUN, persist_result=True, retries=2, retry_delay_seconds=30,
                    retry_condition_fn=transient_only)


def _start(loader: Loader, stage: str) -> None:
    """A fresh report for this stage, and a progress artifact that moves as writes land."""
    loader.report = LoadReport()
    artifact_id = create_progress_artifact(0.0, key=f"load-{stage}", description=f"Progress of the {stage} load")
    loader.on_progress = lambda _stage, done, total: update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))


def _result(loader: Loader) -> dict:
    return {"counts": dict(loader.report.counts), "failures": list(loader.report.failures)}


@task(name="load-users", **LOAD_OPTIONS)
def load_users(loader: Loader, plan: Plan) -> dict:
    _start(loader, "users")
    loader.load_users(plan.users)
    return _result(loader)


@task(name="load-groups", **LOAD_OPTIONS)
def load_groups(loader: Loader, plan: Plan, desired: dict[str, DesiredGroup]) -> dict:
    _start(loader, "groups")
    loader.load_groups(plan.groups, desired)
    return _result(loader)


@task(name="load-memberships", **LOAD_OPTIONS)
def load_memberships(loader: Loader, plan: Plan) -> dict:
    _start(loader, "memberships")
    loader.load_members(plan.members)
    return _result(loader)

