"""Stage 3: choose the groups and users in scope (groups, domains, identifier)."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task

from guardsync.config import AttributeSettings, SyncSettings
from guardsync.models import Snapshot
from guardsync.scope import Scoped, scope
from tasks.common import RECOMPUTED


@task(name="scope", **RECOMPUTED)
def scope_users(snapshot: Snapshot, memberships: pd.DataFrame, sync: SyncSettings,
                attributes: AttributeSettings = AttributeSettings()) -> Scoped:
    scoped = scope(snapshot, memberships, sync, attributes)
    get_run_logger().info(
        "%d candidate users and %d groups in scope (domains: %s); excluded: %s",
        len(scoped.users), len(scoped.groups), ", ".join(scoped.allowed_domains), scoped.excluded,
    )
    return scoped
