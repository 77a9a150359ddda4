"""Stage 1: read the tenant from Microsoft Graph: a delta round merged into the last snapshot,
or a full read (the first run, --full, an expired delta link, or the periodic full read)."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task

from guardsync.delta import apply_changes
from guardsync.graph import DeltaLinks, GraphChanges, GraphClient
from guardsync.models import Snapshot
from tasks.common import PERSISTED, transient_only
from tasks.results import persisted


@persisted
@dataclass
class Extracted:
    snapshot: Snapshot
    links: DeltaLinks
    full: bool  # a complete read: also the moment to check Atlassian for drift
    changed: bool  # a full read, or anything changed since the last run (else the stored snapshot stays as it is)
    based_on: int = 0  # the mirror generation it was read from: a kept extract is never saved over a newer one


@task(name="extract", **PERSISTED, retries=2, retry_delay_seconds=30,
      retry_condition_fn=transient_only)
def extract(graph: GraphClient, previous: Snapshot | None, links: DeltaLinks | None, based_on: int = 0,
            user_columns: list[str] | None = None, changes: GraphChanges | None = None) -> Extracted:
    """`previous` and `links` None means a full read, of `user_columns` (models.user_columns); `based_on`
    is the generation of the mirror they came from. `changes`: the delta round the flow already read
    from `links` (the fast cadence's quick look, which found something): merged, not read again.

    A delta round keeps the stored snapshot's columns: its links select those (a mapping that
    needs more makes the flow read in full)."""
    columns = list(previous.users.columns) if previous is not None else user_columns
    if changes is None:
        changes = graph.read_changes(links if previous is not None else None, columns)
    snapshot = apply_changes(previous, changes)
    get_run_logger().info(
        "%s read of tenant %s (%s): %d users, %d groups, %d direct memberships; %d changed users, %d changed groups, "
        "%d membership changes; %d Graph requests",
        "full" if changes.full else "delta", snapshot.organization, snapshot.tenant_id, len(snapshot.users),
        len(snapshot.groups), len(snapshot.edges), len(changes.users) + len(changes.removed_users),
        len(changes.groups) + len(changes.removed_groups), len(changes.added_edges) + len(changes.removed_edges),
        sum(graph.requests_made.values()),
    )
    return Extracted(snapshot, changes.links, changes.full, not changes.is_empty, based_on)
