"""Product access against Atlassian: observe the groups' grants, then apply an AccessPlan (guardsync.access).

Grants are recorded in the state store as they succeed (table access_grants, with audit rows),
so a retried load skips what is recorded; assign and revoke are idempotent at Atlassian too.
The Organizations API's group ids are not SCIM ids: groups are found by name, once per run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from guardsync.access import AccessPlan, Grant, desired_grants
from guardsync.admin import AdminClient, Workspace
from guardsync.config import AccessSettings
from guardsync.errors import ApiError
from guardsync.load import LoadReport
from guardsync.models import DesiredGroup
from guardsync.models import AppliedState
from guardsync.state import StateStore


@dataclass
class Observed:
    desired: dict[str, frozenset[str]]  # Entra group id -> workspace ids it should hold
    observed: dict[str, frozenset[str]]  # Entra group id -> workspace ids it holds now (user role)
    made: set[tuple[str, str]]  # what guardsync granted before
    workspaces: dict[str, Workspace]


def observe_access(admin: AdminClient, access: AccessSettings, groups: dict[str, DesiredGroup],
                   applied: AppliedState, made: set[tuple[str, str]]) -> Observed:
    """Workspaces, products resolved (ConfigError before any write), and the grants of the groups that matter."""
    desired, workspaces = desired_grants(access.groups, groups, admin.workspaces())
    relevant = sorted(set(desired) | {group_id for group_id, _ in made})
    # The name each group has in Atlassian now: a renamed group is still under its old name.
    names = {gid: applied.groups[gid].display_name if gid in applied.groups else groups[gid].display_name
             for gid in relevant if gid in applied.groups or gid in groups}
    org_ids = admin.find_groups(list(names.values())) if names else {}
    observed = {gid: frozenset(admin.granted(org_ids[name.casefold()]))
                for gid, name in names.items() if name.casefold() in org_ids}
    return Observed(desired, observed, made, workspaces)


class AccessLoader:
    """One run's grants and revocations. `grant_renamed` runs inside load-groups (the rename hook); `load` after the memberships."""

    def __init__(self, admin: AdminClient, store: StateStore, run_id: str, plan: AccessPlan):
        self.admin = admin
        self.store = store
        self.run_id = run_id
        self.plan = plan
        self.report = LoadReport()
        self._lock = threading.Lock()  # the group loader's threads may call grant_renamed at once

    def grant_renamed(self, group_id: str) -> None:
        """Give a renamed group's re-created group its grants; the loader calls this before deleting the old group."""
        grants = self.plan.grants_for(group_id)
        if grants:
            with self._lock:  # the records of these grants are the old group's: grant them all (assign is idempotent)
                failed = self._apply(grants, [], skip_recorded=False)
            if failed:  # deleting the old group now would take the products from its members
                raise ApiError(f"{failed} product grant(s) of the re-created group failed: the old group stays, with "
                               "its product access, until a run grants them", status=424)  # 424: depends on a failed request

    def load(self) -> None:
        """Grants of every group but the renamed ones (granted in load-groups), then revocations, then forgotten records."""
        with self._lock:
            self._apply(self.plan.later_grants(), self.plan.revokes)
            self.store.forget_grants(self.run_id, self.plan.forget)

    def _apply(self, grants: list[Grant], revokes: list[Grant], skip_recorded: bool = True) -> int:
        """Apply and record each; returns how many failed (reported, not raised: the others go on)."""
        recorded = self.store.load_grants()
        if skip_recorded:  # a retried load skips what landed since the plan; a record from before is no proof
            landed = recorded - self.plan.made  # the plan grants a recorded one only when Atlassian lacks it
            grants = [g for g in grants if not (g.recorded and (g.group_id, g.workspace_id) in landed)]
        revokes = [g for g in revokes if (g.group_id, g.workspace_id) in recorded]
        if not grants and not revokes:
            return 0
        failed = 0
        org_ids = self.admin.find_groups(sorted({g.group_name for g in grants + revokes}))
        for operation, items in (("grant", grants), ("revoke", revokes)):
            for grant in items:
                org_id = org_ids.get(grant.group_name.casefold())
                try:
                    if org_id is None:
                        raise ApiError(f"the Organizations API has no group {grant.group_name!r} in this directory yet "
                                       "(a SCIM group takes a moment to reach it): the next run grants it", status=404)
                    (self.admin.assign if operation == "grant" else self.admin.revoke)(org_id, grant.workspace_id)
                except ApiError as exc:
                    self.report.fail(f"access {operation} {grant.product} for {grant.group_name}: {exc}")
                    self.store.record_failure(self.run_id, operation, "group", grant.group_id, grant.group_name, str(exc))
                    failed += 1
                    continue
                self.store.save_grant(self.run_id, operation, grant.group_id, grant.group_name, grant.workspace_id,
                                      grant.product, grant.recorded)
                self.report.count(f"access_{'granted' if operation == 'grant' else 'revoked'}")
        return failed
