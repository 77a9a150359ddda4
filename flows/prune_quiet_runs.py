"""The retention of quiet runs: a directory on the fast cadence runs every minute, and most of those runs
find nothing changed in Entra. Each such run tags itself QUIET_TAG; this maintenance flow deletes the
completed, tagged runs of `sync-directory` that ended more than `keep_hours` ago, through the Prefect API
(the server then deletes their logs). Nothing else is touched: a run that changed, failed, was blocked or
is still going has no tag or another state.

Prefect's own database vacuum (PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED=flow_runs) deletes every run older
than one retention period, whatever it did; it cannot keep the runs that changed something longer than the
quiet ones (README, "The fast cadence").
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow, get_client, get_run_logger, runtime
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

QUIET_TAG = "guardsync-no-change"
SYNC_FLOW = "sync-directory"
PAGE = 200


def tag_quiet_run() -> None:
    """Tag the running flow run as quiet (one PATCH): the retention below may delete it later. A run the
    API would not tag is only kept longer: it completes all the same."""
    run_id, tags = runtime.flow_run.id, list(runtime.flow_run.tags)
    if not run_id or QUIET_TAG in tags:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, tags=[*tags, QUIET_TAG])
    except Exception as exc:  # the Prefect API hiccuped: not a reason to fail a run that did its job
        get_run_logger().warning("could not tag this quiet run %s (%s); the retention of quiet runs will keep it",
                                 QUIET_TAG, type(exc).__name__)


def quiet_runs_before(cutoff: datetime) -> tuple[FlowFilter, FlowRunFilter]:
    """The filter of what may go: sync-directory runs tagged quiet, Completed, ended before `cutoff`."""
    return (FlowFilter(name=FlowFilterName(any_=[SYNC_FLOW])),
            FlowRunFilter(tags=FlowRunFilterTags(all_=[QUIET_TAG]),
                          state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
                          end_time=FlowRunFilterEndTime(before_=cutoff)))


@flow(name="prune-quiet-runs", persist_result=False)
def prune_quiet_runs(keep_hours: float = 24) -> int:
    """Delete the quiet runs of sync-directory that ended more than `keep_hours` ago; the number deleted."""
    if keep_hours <= 0:
        raise ValueError("keep_hours must be more than 0; give how long quiet runs stay visible, e.g. 24")
    cutoff = datetime.now(timezone.utc) - timedelta(hours=keep_hours)
    flows, runs = quiet_runs_before(cutoff)
    deleted = 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_flow_runs(flow_filter=flows, flow_run_filter=runs, limit=PAGE)
            # The filter said so; checked again here, as nothing but a quiet run may ever go.
            doomed = [run.id for run in page
                      if QUIET_TAG in run.tags and run.state_type == StateType.COMPLETED and run.end_time < cutoff]
            for run_id in doomed:
                client.delete_flow_run(run_id)
            deleted += len(doomed)
            if len(page) < PAGE or not doomed:
                break
    get_run_logger().info("deleted %d quiet runs of %s that ended before %s", deleted, SYNC_FLOW,
                          cutoff.isoformat(timespec="seconds"))
    return deleted
