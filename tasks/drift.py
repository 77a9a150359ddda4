"""Full runs only: read the Atlassian side and correct the recorded state where people changed it by hand."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from guardsync.drift import DriftReport, detect_drift
from guardsync.plan import AppliedState
from guardsync.scim import ScimClient
from tasks.common import PER_RUN, transient_only


@task(name="drift", cache_policy=PER_RUN, persist_result=True, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def read_drift(scim: ScimClient, applied: AppliedState) -> tuple[AppliedState, DriftReport]:
    corrected, report = detect_drift(applied, list(scim.iter_users()), list(scim.iter_groups()))
    lines = report.lines() or ["no managed object was changed by hand"]
    for line in report.lines():
        get_run_logger().warning("drift: %s; this run restores it", line)
    create_markdown_artifact(key="drift", markdown="# Drift in Atlassian\n\n" + "\n".join(f"- {line}" for line in lines),
                             description="Managed objects changed by hand, restored by this run")
    return corrected, report
