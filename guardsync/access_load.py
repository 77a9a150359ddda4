"""Product access against Atlassian: observe the groups' grants, apply an AccessPlan (guardsync.access), and
check on a run with no change in Entra that the configured groups still hold their products.

The grant ledger (table access_grants) changes only once Atlassian confirmed: a grant or revocation when
it answered (with its audit row; a retried load skips what this run's assigns confirmed, and assign and
revoke are idempotent at Atlassian too), the rows of a renamed or deleted group once the record shows the
old group gone. One row goes first: a new grant's maker, marked unconfirmed, before it is asked for, taken
back when Atlassian refuses it (StateStore.intend_grant): a kill in between leaves it guardsync's. The
Organizations API's group ids are not SCIM ids: groups are found by name, once per run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from guardsync.access import GUARDSYNC, AccessPlan, Grant, desired_grants
from guardsync.admin import AdminClient, Workspace
from guardsync.config import AccessSettings
from guardsync.errors import ApiError, GuardsyncError
from guardsync.load import LoadReport
from guardsync.models import AppliedState, name_key
from guardsync.state import StateStore
from guardsync.validate import Validated


@dataclass
class Observed:
    desired: dict[str, frozenset[str]]  # Entra group id -> workspace ids it should hold
    observed: dict[str, frozenset[str]]  # Entra group id -> workspace ids it holds now (user role), groups found
    org_ids: dict[str, str]  # Entra group id -> Organizations API group id, groups found
    workspaces: dict[str, Workspace]
    notes: list[str] = field(default_factory=list)


def observe_access(admin: AdminClient, access: AccessSettings, validated: Validated, applied: AppliedState,
                   ledger: dict[tuple[str, str], str], group_kinds: dict[str, str]) -> Observed:
    """Workspaces, products resolved (ConfigError before any write), and the grants of the groups that matter:
    the configured ones, those holding guardsync's grants, and every renamed one (its grants move to its new
    group). Not those created this run (they hold nothing yet), deleted (they take their grants along) or
    quarantined (left as they are): no request for them."""
    desired, workspaces, notes = desired_grants(access.groups, validated.groups, admin.workspaces(),
                                                validated.frozen_group_names)
    ours = {group_id for (group_id, _), maker in ledger.items() if maker == GUARDSYNC}
    renamed = {group_id for group_id, kind in group_kinds.items() if kind == "rename"}
    names = {}  # the name each group has in Atlassian now: a renamed group is still under its old name
    for group_id in sorted(set(desired) | ours | renamed):
        if group_id in validated.frozen_groups or group_kinds.get(group_id) in ("create", "delete"):
            continue
        if group_id in applied.groups:
            names[group_id] = applied.groups[group_id].display_name
        elif group_id in validated.groups:  # adopted this run: found under its name
            names[group_id] = validated.groups[group_id].display_name
    found = admin.find_groups(list(names.values())) if names else {}
    org_ids = {gid: found[name.casefold()] for gid, name in names.items() if name.casefold() in found}
    observed = {gid: frozenset(admin.granted(org_id)) for gid, org_id in org_ids.items()}
    return Observed(desired, observed, org_ids, workspaces, notes)


def access_holds(admin: AdminClient | None, store: StateStore) -> bool:
    """On a run with no change in Entra: does every configured group still hold the products the last completed
    run left it? One role-assignments read per configured group, by the id that run found, and nothing else.
    Any doubt (no record, a group gone, an error) answers False: the run then plans access as every run does."""
    if admin is None:
        return True
    expected = store.access_check()
    if expected is None:
        return False
    try:
        return all(set(workspaces) <= admin.granted(org_id) for org_id, workspaces in sorted(expected.items()))
    except GuardsyncError:
        return False


class AccessLoader:
    """One run's grants and revocations. `grant_renamed` runs inside load-groups (the rename hook); `load` after the memberships."""

    def __init__(self, admin: AdminClient, store: StateStore, run_id: str, plan: AccessPlan):
        self.admin = admin
        self.store = store
        self.run_id = run_id
        self.plan = plan
        self.report = LoadReport()
        self.org_ids: dict[str, str] = {}  # Entra group id -> Organizations API id, of the groups written to
        # The group loader's Loader.restore_groups: re-creates recorded groups found gone when granting (load)
        self.restore_groups: Callable[[list[str]], LoadReport] | None = None
        self._lock = threading.Lock()  # the group loader's threads may call grant_renamed at once

    def grant_renamed(self, group_id: str) -> None:
        """Give a renamed group's re-created group its grants; the loader calls this before deleting the old group."""
        grants = self.plan.grants_for(group_id)
        if grants:
            with self._lock:
                failed = self._apply(grants, [])
            if failed:  # deleting the old group now would take the products from its members
                raise ApiError(f"{failed} product grant(s) of the re-created group failed: the old group stays, with "
                               "its product access, until a run grants them", status=424)  # 424: depends on a failed request

    def load(self) -> None:
        """Hand-made grants seen, into the ledger; grants of every group but the renamed ones (granted in
        load-groups); revocations; the rows of grants that went; what a run with no change in Entra checks."""
        with self._lock:
            self.store.note_hand_made(self.run_id, [(g.group_id, g.group_name, g.workspace_id, g.product)
                                                    for g in self.plan.hand_made])
            self._apply(self.plan.later_grants(), self.plan.revokes, restore=True)
            self.store.forget_grants(self.run_id, self._gone())
            self.store.save_access_check(self._expected())

    def _gone(self) -> list[tuple[str, str]]:
        """The ledger rows to forget whose group's fate Atlassian confirmed: a renamed group's old group deleted
        (the record holds the new name), a deleted group gone from the record; other rows (grants removed by hand) now."""
        recorded = self.store.group_names()

        def confirmed(group_id: str) -> bool:
            if group_id in self.plan.renamed:
                return name_key(recorded.get(group_id, "")) == name_key(self.plan.renamed[group_id])
            return group_id not in recorded if group_id in self.plan.goes else True

        return [(group_id, workspace_id) for group_id, workspace_id in self.plan.forget if confirmed(group_id)]

    def _expected(self) -> dict[str, list[str]] | None:
        """Organizations API group id -> the workspaces each configured group holds now; None when a group's
        id is unknown (it could not be found: the next run with no change in Entra plans access again)."""
        wanted = {gid: workspaces for gid, workspaces in self.plan.expected.items() if workspaces}
        ids = {gid: self.org_ids.get(gid) or (self.plan.org_ids.get(gid) if gid not in self.plan.renamed else None)
               for gid in wanted}
        if missing := [gid for gid, org_id in ids.items() if org_id is None]:  # e.g. a retried load granted nothing
            found = self.admin.find_groups([self.plan.names[gid] for gid in missing])
            ids.update({gid: found.get(self.plan.names[gid].casefold()) for gid in missing})
        if any(org_id is None for org_id in ids.values()):
            return None
        return {ids[gid]: sorted(workspaces) for gid, workspaces in wanted.items()}

    def _apply(self, grants: list[Grant], revokes: list[Grant], restore: bool = False) -> int:
        """Apply and record each; returns how many failed (reported, not raised: the others go on). With `restore`,
        a recorded group the Organizations API lacks is re-created first (restore_groups)."""
        confirmed = self.store.grants_confirmed_in(self.run_id)  # a retried load skips what landed
        grants = [g for g in grants if (g.group_id, g.workspace_id) not in confirmed]
        ours = {key for key, maker in self.store.load_grants().items() if maker == GUARDSYNC}
        revokes = [g for g in revokes if (g.group_id, g.workspace_id) in ours]
        if not grants and not revokes:
            return 0
        failed = 0
        org_ids = self.admin.find_groups(sorted({g.group_name for g in grants + revokes}))
        unfound = {g.group_id for g in grants if g.group_name.casefold() not in org_ids}
        if restore and unfound and self.restore_groups is not None:
            # A group the record holds but Atlassian does not: deleted by hand since it was made. A delta run plans
            # from the record and met no 404 for it (no SCIM write touched it), so only the grant finds out: the
            # group loader plans it again and re-creates it (the one planner), then it is granted. A group still
            # there (only slow to reach the Organizations API) is read, found, and left alone.
            restored = self.restore_groups(sorted(unfound))
            for key, value in restored.counts.items():
                self.report.count(key, value)
            for line in restored.failures:
                self.report.fail(line)
            org_ids |= self.admin.find_groups(sorted({g.group_name for g in grants if g.group_id in unfound}))
        for operation, items in (("grant", grants), ("revoke", revokes)):
            for grant in items:
                org_id = org_ids.get(grant.group_name.casefold())
                # The ledger names the maker before the grant is asked for: a run killed once Atlassian applied it,
                # before it was recorded, must not find it on the next run as a grant nobody made (hand-made).
                intended = operation == "grant" and self.store.intend_grant(self.run_id, grant.group_id,
                                                                            grant.workspace_id, grant.product, grant.maker)
                try:
                    if org_id is None:
                        raise ApiError(f"the Organizations API has no group {grant.group_name!r} in this directory yet "
                                       "(a SCIM group takes a moment to reach it): the next run grants it", status=404)
                    (self.admin.assign if operation == "grant" else self.admin.revoke)(org_id, grant.workspace_id)
                except ApiError as exc:
                    if intended:  # refused: nobody made it
                        self.store.drop_intended_grant(grant.group_id, grant.workspace_id)
                    self.report.fail(f"access {operation} {grant.product} for {grant.group_name}: {exc}")
                    self.store.record_failure(self.run_id, operation, "group", grant.group_id, grant.group_name, str(exc))
                    failed += 1
                    continue
                self.org_ids[grant.group_id] = org_id
                self.store.save_grant(self.run_id, operation, grant.group_id, grant.group_name, grant.workspace_id,
                                      grant.product, grant.maker)
                self.report.count(f"access_{'granted' if operation == 'grant' else 'revoked'}")
        return failed
