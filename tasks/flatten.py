"""Stage 2: flatten nested groups into effective user memberships."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task

from guardsync.flatten import effective_memberships
from guardsync.models import Snapshot
from tasks.common import RECOMPUTED


@task(name="flatten", **RECOMPUTED)
def flatten(snapshot: Snapshot) -> pd.DataFrame:
    memberships = effective_memberships(snapshot.edges, snapshot.groups["id"])
    get_run_logger().info("%d effective memberships across %d groups", len(memberships), len(snapshot.groups))
    return memberships
