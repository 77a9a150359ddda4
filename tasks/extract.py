"""Stage 1: read the tenant from Microsoft Graph."""

from __future__ import annotations

from prefect import get_run_logger, task

from guardsync.graph import GraphClient
from guardsync.models import Snapshot
from tasks.common import PER_RUN, transient_only


@task(name="extract", cache_policy=PER_RUN, persist_result=True, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def extract(graph: GraphClient) -> Snapshot:
    snapshot = graph.extract()
    get_run_logger().info(
        "read %d users, %d groups, %d direct memberships from tenant %s (%s) in %d Graph requests",
        len(snapshot.users), len(snapshot.groups), len(snapshot.edges), snapshot.organization,
        snapshot.tenant_id, sum(graph.requests_made.values()),
    )
    return snapshot
