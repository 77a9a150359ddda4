"""Guards: whole-run checks on the plan, before any write (pure).

Each returns a GuardsyncBlocked to raise, or None. They protect against the worst
failures in this field: mass deprovisioning after a bad read, and a store that
belongs to another directory (checked by StateStore.check_binding).
"""

from __future__ import annotations

from guardsync.config import SyncSettings
from guardsync.errors import GuardsyncBlocked
from guardsync.changes import Plan
from guardsync.models import AppliedState


def managed_active_users(applied: AppliedState, plan: Plan, first_run: bool) -> int:
    """What a percentage of max_deactivations is of: the active users guardsync managed before the
    run, and on a first run the active accounts it adopts (so a first run against a populated
    directory is guarded too, while a first run against an empty one is not)."""
    return applied.active_users() + (plan.adopted_active if first_run else 0)


def too_many_deprovisions(plan: Plan, managed_active: int, sync: SyncSettings, allow: bool = False) -> GuardsyncBlocked | None:
    """More deactivations plus group deletions than max_deactivations (renames do not count)."""
    if allow:
        return None
    limit = sync.deactivation_limit(managed_active)
    count = plan.deprovisions()
    if limit is None or count <= limit:
        return None
    return GuardsyncBlocked(
        "max_deactivations",
        f"this run would deactivate or delete {count} objects, over the limit of {limit} "
        f"([sync] max_deactivations = {sync.max_deactivations!s}, {managed_active} active users managed)",
        "Check the scope (groups, domains) and Entra for an accidental change; if the change is intended, "
        "re-run once with --allow-mass-deactivation",
    )


def empty_scope(active_in_scope: int, applied: AppliedState) -> GuardsyncBlocked | None:
    """No user in scope where active users were synced before: a bad read must never deprovision."""
    if active_in_scope > 0 or applied.active_users() == 0:
        return None
    return GuardsyncBlocked(
        "empty_scope",
        f"no active user is in scope, but {applied.active_users()} active users were synced before",
        "Check the Entra read (permissions, the pilot group's members, [sync] domains); nothing was changed",
    )
