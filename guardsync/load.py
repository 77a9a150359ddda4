"""Apply a plan to Atlassian through the SCIM client, recording each write as it succeeds.

Safe to re-run at any point: a retried load (same flow run) skips what the audit
shows this run already wrote; a create whose earlier attempt reached Atlassian but
not the store answers 409 and is planned again (below), so nothing is ever duplicated.

One planner: a write that meets 404 (the object was deleted by hand) or 409 (a name it
needs is taken) is set aside until its wave is done. Then the loader reads those objects
(by id, userName, externalId, displayName), plans again with guardsync.plan's functions
against the record corrected by what it read (a partial Observation, as a full read makes
a whole one) and applies what that plan does for them: an account deleted by hand is
re-created in its groups, or recorded as gone for a leaver; a name found taken is
adopted where the adoption rule says so. What the load does besides is what the plan
shown (and, in a dry run, counted) says. A write of the new plan that meets 404 or 409
again is reported with what was read: it is no longer a race but a fact someone must see.

User writes and member PATCHes are recorded a batch at a time (RECORD_EVERY writes,
and whatever is left when a stage ends), in one transaction: one transaction a write
was a third of a write's client CPU. A kill loses the records of at most one batch,
and the re-run converges as above (creates are adopted, updates and PATCHes repeat
harmlessly). Group creates, renames and deletes are recorded one by one. Before every
batch the loader checks that its run still holds the directory (check_lease).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, TypeVar

from guardsync.changes import PAST, GroupChange, MemberChange, Plan, UserChange
from guardsync.errors import ApiError, Conflict, NotFound
from guardsync.models import AppliedState, DesiredUser, name_key
from guardsync.observe import observe_some
from guardsync.plan import PlanInputs
from guardsync.scim import ScimClient
from guardsync.state import StateStore
from guardsync.throttle import AdaptiveLimit

RECORD_EVERY = 100  # writes recorded in one transaction (and the lease checked before each such batch)
# Threads a stage runs beyond write_concurrency: while `write_concurrency` requests are out at
# Atlassian (the limit holds that), the spares prepare the next requests and read the answers,
# so the client's own work never leaves a slot empty.
SPARE_THREADS = 4
# Audit operations that mean "this object is done for this run" (a retried load skips it).
USER_OPERATIONS = ("create", "update", "deactivate", "reactivate", "adopt", "handover")
GROUP_OPERATIONS = ("create", "adopt", "rename", "delete")
# A group whose members were set by a re-plan this run (its member changes and foreign members are done).
REPLANNED = "replanned"
# The record made what Atlassian was seen to hold (Plan.observed_*): each object's row, and once a run the marker.
OBSERVED, OBSERVED_ONCE = "observed", "record-observed"
T = TypeVar("T")


@dataclass
class LoadReport:
    counts: Counter = field(default_factory=Counter)  # users_created, groups_adopted, members_added, ...
    failures: list[str] = field(default_factory=list)  # one line each: object, operation, Atlassian's words
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def fail(self, line: str) -> None:
        with self._lock:
            self.failures.append(line)


@dataclass
class _Met:
    """A write set aside: it met 404 or 409."""

    change: UserChange | GroupChange | MemberChange | tuple[str, tuple[str, ...]]  # (group id, foreign SCIM ids)
    error: ApiError


@dataclass
class _Reads:
    """What a re-plan read of Atlassian."""

    users: dict[str, dict] = field(default_factory=dict)  # SCIM id -> account
    groups: dict[str, dict] = field(default_factory=dict)  # SCIM id -> group
    missing_users: set[str] = field(default_factory=set)  # SCIM ids answered 404
    missing_groups: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # identifiers looked up (name_key)


class Loader:
    """One run's writes: users, then groups, then memberships. `inputs` is what the plan was made from
    (the desired state): a write that meets 404 or 409 is planned again from it."""

    def __init__(self, scim: ScimClient, store: StateStore, run_id: str, inputs: PlanInputs, concurrency: int = 4,
                 on_progress: Callable[[str, int, int], None] | None = None):
        self.scim = scim
        self.store = store
        self.run_id = run_id
        self.inputs = inputs
        self.concurrency = concurrency
        self.report = LoadReport()
        self.on_progress = on_progress or (lambda stage, done, total: None)
        # Called before each batch of writes; raises when the run no longer holds the directory (DirectoryRun).
        self.check_lease: Callable[[], None] = lambda: None
        # Called with a renamed group's Entra id once its re-created group holds the members and before the
        # old group is deleted: product access moves to the new group first ([access], AccessLoader.grant_renamed).
        self.before_rename_delete: Callable[[str], None] | None = None
        # Applied in Atlassian, not yet in the store: (operation, scim id, user), (group id, added, removed).
        self._users_to_record: list[tuple[str, str, DesiredUser]] = []
        self._members_to_record: list[tuple[str, list[str], list[str]]] = []
        self._record_lock = threading.Lock()
        self._writes = 0  # writes started: the lease is checked before every RECORD_EVERY-th

    # -- plumbing ------------------------------------------------------------------
    def _each(self, stage: str, items: list[T], apply: Callable[[T], None], describe: Callable[[T], str],
              set_aside: bool = True) -> list[_Met]:
        """Apply every item with a few threads; a 4xx on one item is recorded and the rest go on. With
        `set_aside`, an item that meets 404 or 409 is returned instead, to be planned again."""
        done = 0
        met: list[_Met] = []

        def tick() -> None:  # report from the caller's thread, where the Prefect run context lives
            nonlocal done
            done += 1
            if done % RECORD_EVERY == 0:
                self._record()
            if done % 200 == 0 or done == len(items):
                self.on_progress(stage, done, len(items))

        self.scim.limit = AdaptiveLimit(self.concurrency)  # a 429 halves the requests in flight

        def one(item: T) -> None:
            with self._record_lock:
                batch_starts = self._writes % RECORD_EVERY == 0
                self._writes += 1
            if batch_starts:
                self.check_lease()
            try:
                apply(item)
            except ApiError as exc:
                if set_aside and isinstance(exc, (NotFound, Conflict)):
                    with self._record_lock:
                        met.append(_Met(item, exc))
                else:  # Atlassian refused this object: show its words, keep going
                    self._failed(stage, describe(item), str(exc))

        try:
            if self.concurrency <= 1 or len(items) <= 1:
                for item in items:
                    one(item)
                    tick()
                return met
            pool = ThreadPoolExecutor(self.concurrency + SPARE_THREADS, thread_name_prefix=f"load-{stage}")
            try:
                for future in as_completed([pool.submit(one, item) for item in items]):
                    future.result()  # re-raises a fatal error (auth, transient after retries, a lost lease) here
                    tick()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            return met
        finally:
            self._record()  # whatever landed, even when the stage fails

    def _failed(self, stage: str, name: str, detail: str) -> None:
        self.report.fail(f"{stage} {name}: {detail}")
        self.store.record_failure(self.run_id, stage, stage.rstrip("s"), name, None, detail)

    def _record(self) -> None:
        """Write the pending records to the store, in one transaction."""
        with self._record_lock:
            users, self._users_to_record = self._users_to_record, []
            member_changes, self._members_to_record = self._members_to_record, []
        self.store.save_users(self.run_id, users)
        self.store.save_members(self.run_id, member_changes)

    def _user_written(self, operation: str, scim_id: str, user: DesiredUser) -> None:
        with self._record_lock:
            self._users_to_record.append((operation, scim_id, user))

    def _members_written(self, group_id: str, added: list[str], removed: list[str]) -> None:
        with self._record_lock:
            self._members_to_record.append((group_id, added, removed))

    # -- users -----------------------------------------------------------------------
    def load_users(self, plan: Plan) -> None:
        """Forget the accounts deleted by hand whose users left, keep who was seen without an account, then
        write the changes wave by wave (a change that takes an identifier runs after the one that gives it up)."""
        changes, forget = list(plan.users), list(plan.forget_users)
        self.record_observed(plan)
        self.store.keep_no_account(plan.no_account, replace=plan.no_account_all)
        if not changes and not forget:
            return  # nothing to do: not even a read of the state
        applied = self.store.load()
        if forget:
            self.store.forget_users(self.run_id, [u for u in forget if u in applied.users])
            self.report.count("users_gone", len(forget))
        done = self.store.done_in_run(self.run_id, USER_OPERATIONS)
        # A released account is written again on a retry (the same PUT): its user's id is done by then.
        for wave in _waves([c for c in changes if c.release or c.user.external_id not in done]):
            met = self._each("users", wave, self._apply_user, lambda c: c.user.user_name)
            if met:
                self._replan_users(plan, met)

    def record_observed(self, plan: Plan) -> None:
        """Before the first write of the run (once: a retried load has recorded writes since), make the record
        what the plan saw Atlassian hold: the plan's changes are made against that."""
        if (plan.observed_users or plan.observed_members) and not self.store.done_in_run(self.run_id, (OBSERVED_ONCE,)):
            self._correct_record(plan, self.store.load())
            self.store.note(self.run_id, OBSERVED_ONCE, "run", self.run_id, None,
                            f"recorded as observed: {len(plan.observed_users)} accounts, "
                            f"{len(plan.observed_members)} groups' members")

    def _correct_record(self, plan: Plan, recorded: AppliedState) -> AppliedState:
        """Record Plan.observed_* over `recorded`; returns the record as it is then (read again only if changed)."""
        if not (plan.observed_users or plan.observed_members):
            return recorded
        self.store.save_users(self.run_id, [(OBSERVED, user.scim_id, user.record) for user in plan.observed_users.values()])
        self.store.save_members(self.run_id, [
            (gid, sorted(held - recorded.members.get(gid, frozenset())), sorted(recorded.members.get(gid, frozenset()) - held))
            for gid, held in plan.observed_members.items() if gid in recorded.groups], operation=OBSERVED)
        return self.store.load()

    def _apply_user(self, change: UserChange) -> None:
        user = change.user
        if change.scim_id is None:
            created = self.scim.create_user(user)
            self._user_written("create", created["id"], user)
        elif change.release:  # an old account left behind: deactivated, and recorded for no one
            self.scim.replace_user(change.scim_id, user)
            self.store.note(self.run_id, "release", "user", change.handed_from, user.user_name,
                            json.dumps({"scim_id": change.scim_id, "deactivated": True}))
        else:
            if change.write:
                self.scim.replace_user(change.scim_id, user)
            if change.handed_from:  # the account passes to this Entra user; the old id no longer maps to it
                self._record()
                self.store.hand_over(self.run_id, change.handed_from, change.scim_id, user)
            else:
                self._user_written(_user_operation(change), change.scim_id, user)
        for key in change.count_keys():
            self.report.count(key)

    def _replan_users(self, plan: Plan, met: list[_Met]) -> None:
        """Read the accounts these user writes met 404 or 409 on, plan them again, apply that."""
        reads = _Reads()
        for item in met:
            change = item.change
            if isinstance(item.error, NotFound):
                reads.missing_users.add(change.scim_id)  # deleted by hand since the plan was made
            if isinstance(item.error, Conflict) or (change.user.active and not change.release):
                # it may need an account, or its identifier is taken: who holds that identifier now?
                self._read_account(change.user, reads)
        self._record()
        recorded = self.store.load()
        replanned = self._plan_again(recorded, reads)
        recorded = self._correct_record(replanned, recorded)
        # What this concerns: the users set aside, whose accounts were read, and the accounts they held.
        failing = {_user_key(item.change): item for item in met}
        users = {c.user.external_id for c in (item.change for item in met) if not c.release}
        users |= {c.handed_from for c in (item.change for item in met) if c.handed_from}
        owners = {u.scim_id: uid for uid, u in recorded.users.items()}
        accounts = set(reads.users) | reads.missing_users | {item.change.scim_id for item in met if item.change.scim_id}
        users |= {owners[s] for s in accounts if s in owners}
        accounts |= {recorded.users[u].scim_id for u in users if u in recorded.users}
        planned = {_normal(c) for c in plan.users}
        todo = []
        for change in replanned.users:
            item = failing.pop(_user_key(change), None)
            if item is not None:
                if _normal(change) == _normal(item.change):  # the same write again: a fact, not a race
                    self._failed("users", change.user.user_name, f"{item.error}; {_read_users(change.user, reads, owners)}")
                    continue
                todo.append(change)
            elif (change.user.external_id in users or change.scim_id in accounts or change.handed_from in users) \
                    and _normal(change) not in planned:
                todo.append(change)
        gone = [u for u in replanned.forget_users if u in users]
        if gone:  # deleted by hand, and its user left (or gave its identifier to another): never created again
            self.store.forget_users(self.run_id, gone)
            self.report.count("users_gone", len(gone))
        for wave in _waves(todo):
            self._each("users", wave, self._apply_user, lambda c: c.user.user_name, set_aside=False)
        self._record()
        self._apply_member_news(plan, replanned, users, accounts)

    def _read_account(self, user: DesiredUser, reads: _Reads) -> None:
        found = self.scim.find_account(user)
        reads.names.add(name_key(user.user_name))
        if found is not None:
            reads.users[found["id"]] = found

    def _apply_member_news(self, plan: Plan, replanned: Plan, users: set[str], accounts: set[str]) -> None:
        """Memberships a user re-plan adds to the plan (an account re-created, adopted or released in existing
        groups), applied now; the rest of each group's changes stay with the plan's own stages."""
        groups = self.store.load().groups
        planned = {c.group_id: c for c in plan.members}
        for change in replanned.members:
            before = planned.get(change.group_id, MemberChange(change.group_id, (), ()))
            add = [u for u in change.add if u in users and u not in before.add]
            remove = [u for u in change.remove if u in users and u not in before.remove]
            if (add or remove) and change.group_id in groups:
                group = groups[change.group_id]
                try:
                    self._patch_now(change.group_id, group.scim_id, add, remove, operation="rejoin")
                except ApiError as exc:
                    self._failed("members", group.display_name, str(exc))
        for group_id, scim_ids in replanned.foreign.items():
            extra = [s for s in scim_ids if s in accounts and s not in plan.foreign.get(group_id, ())]
            if extra and group_id in groups:  # accounts let go: out of the groups
                group = groups[group_id]
                try:
                    self.scim.patch_members(group.scim_id, [], extra)
                except ApiError as exc:
                    self._failed("members", group.display_name, str(exc))
                    continue
                self.store.note(self.run_id, "release_member", "group", group_id, group.display_name,
                                f"removed {len(extra)} accounts let go this run: {', '.join(extra)}")
                self.report.count("members_removed", len(extra))

    # -- groups ----------------------------------------------------------------------
    def load_groups(self, plan: Plan) -> None:
        """Create, rename, adopt and delete groups, wave by wave (a name is taken after it is freed);
        renamed groups get their members here, new and adopted ones in load_members."""
        changes, forget = list(plan.groups), list(plan.forget_groups)
        if not changes and not forget:
            return
        applied = self.store.load()
        for group_id in forget:
            if group_id in applied.groups:
                self.store.drop_group(self.run_id, group_id, applied.groups[group_id].display_name, operation="gone")
        done = self.store.done_in_run(self.run_id, GROUP_OPERATIONS)
        members = {change.group_id: change for change in plan.members}
        for wave in _waves([c for c in changes if c.group_id not in done]):
            met = self._each("groups", wave, lambda c: self._apply_group(c, applied, members), lambda c: c.display_name)
            if met:
                self._replan_groups(plan, met)

    def _apply_group(self, change: GroupChange, applied: AppliedState, members: dict[str, MemberChange]) -> None:
        before = applied.groups.get(change.group_id)
        if change.kind == "delete":
            self._delete_group(before.scim_id)
            self.store.drop_group(self.run_id, change.group_id, change.display_name)
            self.report.count("groups_deleted")
            return
        if change.takes_existing:  # it is ours now, matched by Entra id; its name stays
            scim_id = change.scim_id
            self.scim.set_group_external_id(scim_id, change.group_id)
        else:
            scim_id = self.scim.create_group(change.display_name, change.group_id)["id"]
        held = change.members if change.kind == "adopt" else frozenset()
        if change.kind == "rename":
            # Atlassian refuses renames: the new group takes the members before the old one goes.
            moved = members.get(change.group_id, MemberChange(change.group_id, (), ()))
            added, removed = self._patch_now(change.group_id, scim_id, list(moved.add), list(moved.remove),
                                             operation=None, users=applied.users)
            held = frozenset((set(change.members) | set(added)) - set(removed))
            if self.before_rename_delete is not None:
                self.before_rename_delete(change.group_id)
            self._delete_group(before.scim_id)
        self.store.save_group(self.run_id, change.kind, change.group_id, scim_id, change.display_name, members=held)
        for key in change.count_keys():
            self.report.count(key)

    def _replan_groups(self, plan: Plan, met: list[_Met]) -> None:
        """Read the groups these writes met 409 (a name taken) or 404 (a group to adopt, gone) on, plan them
        again, apply that: the group and its members, done for this run."""
        reads = _Reads()
        for item in met:
            self._read_group(item.change.display_name, reads)
        self._replan_group_ids(plan, {item.change.group_id: item for item in met}, reads)

    def _read_group(self, display_name: str, reads: _Reads) -> None:
        """The group holding a name, and (when frozen users keep their memberships) its members' accounts."""
        found = self.scim.find_group(display_name)
        if found is None:
            return
        reads.groups[found["id"]] = found
        if not self.inputs.frozen_names:
            return
        managed = {u.scim_id for u in self.store.load().users.values()}
        for member in found.get("members") or []:
            if member["value"] not in managed and member["value"] not in reads.users:
                try:  # whose account is it? a frozen user's stays in the group
                    reads.users[member["value"]] = self.scim.get_user(member["value"])
                except NotFound:
                    continue

    def _replan_group_ids(self, plan: Plan | None, failing: dict[str, _Met], reads: _Reads) -> None:
        recorded = self.store.load()
        replanned = self._plan_again(recorded, reads)
        recorded = self._correct_record(replanned, recorded)
        group_changes = {c.group_id: c for c in replanned.groups}
        members = {c.group_id: c for c in replanned.members}
        holders = {g.scim_id: gid for gid, g in recorded.groups.items()}
        for group_id, item in failing.items():
            change = group_changes.get(group_id)
            desired = self.inputs.groups.get(group_id)
            name = item.change.display_name if isinstance(item.change, GroupChange) else desired.display_name if desired else group_id
            if change is not None and isinstance(item.change, GroupChange) and _normal(change) == _normal(item.change):
                self._failed("groups", name, f"{item.error}; {_read_group(change.display_name, reads, holders)}")
                continue
            try:
                if change is not None:
                    self._apply_group(change, recorded, members)
                    recorded = self.store.load()
                group = recorded.groups.get(group_id)
                if group is None:
                    continue
                if change is None or change.kind != "rename":  # a rename moved its members itself
                    moved = members.get(group_id)
                    if moved is not None:
                        self._patch_now(group_id, group.scim_id, list(moved.add), list(moved.remove), operation="members",
                                        users=recorded.users)
                if foreign := replanned.foreign.get(group_id):
                    self.scim.patch_members(group.scim_id, [], list(foreign))
                    self.report.count("members_removed", len(foreign))
                self.store.note(self.run_id, REPLANNED, "group", group_id, group.display_name,
                                f"planned again after {item.error.__class__.__name__}; removed {len(foreign or ())} "
                                "members guardsync does not manage")
            except ApiError as exc:  # again: reported, not chased
                self._failed("groups", name, f"{exc} (after {item.error})")

    def _delete_group(self, scim_id: str) -> None:
        try:
            self.scim.delete_group(scim_id)
        except NotFound:
            pass  # already gone: the goal is reached

    # -- memberships -------------------------------------------------------------------
    def load_members(self, plan: Plan) -> None:
        """Accounts guardsync does not manage taken out of its groups (found by an observation: people added by
        hand to a managed group, and other members of an adopted one), then the members to add and remove."""
        if not plan.members and not plan.foreign:
            return
        applied = self.store.load()
        replanned = self.store.done_in_run(self.run_id, (REPLANNED,))
        # renamed, or planned again after a 404/409: members set in load_groups
        done = self.store.done_in_run(self.run_id, ("members", "rename")) | replanned
        foreign_done = self.store.done_in_run(self.run_id, ("remove_foreign",)) | replanned
        work = [(group_id, applied.groups[group_id].scim_id, list(scim_ids)) for group_id, scim_ids in plan.foreign.items()
                if group_id in applied.groups and group_id not in foreign_done]
        met = self._each("members", work, lambda w: self._remove_foreign(*w, names=applied.groups), lambda w: w[0])
        work = []
        for change in plan.members:
            group = applied.groups.get(change.group_id)
            if group is None or change.group_id in done:
                continue  # its create failed (reported there), or this run already set its members
            work.append((change.group_id, group.scim_id, list(change.add), list(change.remove)))
        # A group's PATCHes go one after the other (up to 220 of them for a 22k-member group):
        # the longest chains start first, so the stage does not end waiting on one of them.
        work.sort(key=lambda w: len(w[2]) + len(w[3]), reverse=True)
        met += self._each("members", work, lambda w: self._patch(*w, users=applied.users), lambda w: w[0])
        if met:  # a group deleted by hand meanwhile: read its name, plan it again
            self._replan_gone_groups([(item.change[0], item.change[1], item.error) for item in met])

    def _replan_gone_groups(self, gone: list[tuple[str, str, ApiError]]) -> None:
        """Groups a write found gone (group id, its SCIM id, the answer): read their names, plan them again, apply."""
        reads = _Reads()
        failing = {}
        for group_id, scim_id, error in gone:
            reads.missing_groups.add(scim_id)
            if group_id in self.inputs.groups:
                self._read_group(self.inputs.groups[group_id].display_name, reads)
            failing[group_id] = _Met((group_id, ()), error)
        reads.missing_groups -= set(reads.groups)  # found by its name after all: the 404 was about something else
        self._replan_group_ids(None, failing, reads)

    def restore_groups(self, group_ids: list[str]) -> LoadReport:
        """Recorded groups the Organizations API lacks when load-access grants them: deleted by hand since, which a
        delta run's plan (made from the record) cannot know, and no SCIM write of this run met. Handled as a
        member PATCH meeting 404 is: read, planned again, re-created with their members. Returns what it did."""
        self.report = LoadReport()
        recorded = self.store.load().groups
        self._replan_gone_groups([(gid, recorded[gid].scim_id, NotFound("the Organizations API has no such group", 404))
                                  for gid in group_ids if gid in recorded])
        return self.report

    def _remove_foreign(self, group_id: str, group_scim_id: str, scim_ids: list[str], names) -> None:
        self.scim.patch_members(group_scim_id, [], scim_ids)
        self.store.note(self.run_id, "remove_foreign", "group", group_id, names[group_id].display_name,
                        f"removed {len(scim_ids)} members added by hand: {', '.join(scim_ids[:20])}")
        self.report.count("members_removed", len(scim_ids))

    def _patch(self, group_id: str, group_scim_id: str, add: list[str], remove: list[str], users) -> None:
        add = [u for u in add if u in users]  # a user whose create failed cannot join yet
        remove_scim = [users[u].scim_id for u in remove if u in users]  # an account forgotten this run left already
        self.scim.patch_members(group_scim_id, [users[u].scim_id for u in add], remove_scim)
        self._members_written(group_id, add, remove)
        self.report.count("members_added", len(add))
        self.report.count("members_removed", len(remove_scim))

    def _patch_now(self, group_id: str, group_scim_id: str, add: list[str], remove: list[str],
                   operation: str | None, users=None) -> tuple[list[str], list[str]]:
        """PATCH a group's members at once (outside the members stage); recorded under `operation` unless None.
        Returns the user ids added and removed."""
        users = users if users is not None else self.store.load().users
        add = [u for u in add if u in users]  # a user whose create failed cannot join yet
        remove = [u for u in remove if u in users]
        if add or remove:
            self.scim.patch_members(group_scim_id, [users[u].scim_id for u in add], [users[u].scim_id for u in remove])
        if operation is not None:
            self.store.save_members(self.run_id, [(group_id, add, remove)], operation=operation)
        self.report.count("members_added", len(add))
        self.report.count("members_removed", len(remove))
        return add, remove

    # -- planning again ------------------------------------------------------------------
    def foresee(self, plan: Plan, granted: Iterable[str] = (), looked_up: Iterable[DesiredUser] = ()) -> Plan:
        """What the dry run of a plan made from the record (a delta run) shows: the objects its writes would find
        gone (404) or whose name is taken (409), read instead of written, and the plan made again with that, as the
        sync's loader plans again what its writes meet (one planner; `make_plan` cannot tell the two apart). An
        object found as recorded adds nothing: a write learns no more than that it landed. `granted`: recorded
        groups load-access grants to, which it re-creates when they are gone (restore_groups); `looked_up`: the
        users the plan looked up (tasks.observe.look_up_atlassian), read again so the new plan knows them too.
        Only GETs."""
        recorded = self.store.load()
        ours_users = {user.scim_id for user in recorded.users.values()}
        ours_groups = {group.scim_id for group in recorded.groups.values()}
        reads, taken = _Reads(), _Reads()
        for user in looked_up:
            self._read_account(user, reads)
        known = len(reads.users)
        gone_users = self._gone(self.scim.get_user, [c.scim_id for c in plan.users if c.scim_id is not None and c.write])
        for change in plan.users:
            if change.scim_id in gone_users:
                reads.missing_users.add(change.scim_id)
                if change.user.active and not change.release:
                    self._read_account(change.user, reads)
            elif not change.release and (change.scim_id is None or _renames(change, recorded)):
                # a POST, or a PUT that changes the userName, meets 409 where an account not ours holds that name
                if (held := self.scim.find_user(user_name=change.user.user_name)) is not None:
                    taken.users[held["id"]] = held
        for change in plan.groups:
            if change.kind in ("create", "rename") and not change.takes_existing:
                self._read_group(change.display_name, taken)
        written = {c.group_id for c in plan.groups}
        touched = [gid for gid in sorted(({c.group_id for c in plan.members} | set(granted)) - written)
                   if gid in recorded.groups]
        gone_groups = self._gone(self.scim.get_group, [recorded.groups[gid].scim_id for gid in touched])
        for group_id in touched:
            if recorded.groups[group_id].scim_id in gone_groups:
                reads.missing_groups.add(recorded.groups[group_id].scim_id)
                if group_id in self.inputs.groups:
                    self._read_group(self.inputs.groups[group_id].display_name, reads)
        reads.missing_groups -= set(reads.groups)
        reads.users |= {scim_id: user for scim_id, user in taken.users.items() if scim_id not in ours_users}
        reads.groups |= {scim_id: group for scim_id, group in taken.groups.items() if scim_id not in ours_groups}
        if not (len(reads.users) > known or reads.groups or reads.missing_users or reads.missing_groups):
            return plan
        foreseen = self._plan_again(recorded, reads)
        foreseen.holds = plan.holds  # the guards the sync meets are the plan's: it plans again only while writing
        return foreseen

    def _gone(self, get: Callable[[str], dict], scim_ids: list[str]) -> set[str]:
        """Which of these objects Atlassian no longer holds: a GET each, `concurrency` at a time."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return {scim_id for scim_id, held in zip(scim_ids, pool.map(lambda s: _exists(get, s), scim_ids)) if not held}

    def _plan_again(self, recorded: AppliedState, reads: _Reads) -> Plan:
        """The plan of the whole desired state against the record as this run left it so far, corrected by
        what was just read: guardsync.plan's functions, as an observing run calls them."""
        observation = observe_some(recorded, list(reads.users.values()), list(reads.groups.values()),
                                   reads.missing_users, reads.missing_groups, frozenset(reads.names))
        return self.inputs.plan(recorded, observation)


def _renames(change: UserChange, recorded: AppliedState) -> bool:
    before = recorded.users.get(change.user.external_id)
    return before is not None and name_key(before.record.user_name) != name_key(change.user.user_name)


def _exists(get: Callable[[str], dict], scim_id: str) -> bool:
    try:
        get(scim_id)
    except NotFound:
        return False
    return True


def _user_operation(change: UserChange) -> str:
    """The audit operation of a user write ("adopt" for every adoption, whatever else it changed)."""
    return "adopt" if change.adopted else change.kind


def _user_key(change: UserChange) -> tuple[str, str]:
    """What a user change writes: an account let go (by its SCIM id), else the user's account."""
    return ("account", change.scim_id) if change.release else ("user", change.user.external_id)


def _normal(change):
    """A change as compared across two plans: its wave is the plan's ordering, not what it writes."""
    return replace(change, wave=0)


def _read_users(user: DesiredUser, reads: _Reads, owners: dict[str, str]) -> str:
    """What a user's re-plan read, for the operator: why the same write would meet the same answer."""
    held = next((r for r in reads.users.values() if name_key(r.get("userName") or "") == name_key(user.user_name)), None)
    if held is not None and held["id"] in owners and owners[held["id"]] != user.external_id:
        return (f"userName {user.user_name} is held by the account guardsync manages for Entra user {owners[held['id']]}; "
                "it passes to this user once that user gives it up (renamed, deleted or out of scope in Entra)")
    if held is None:
        return (f"read again, Atlassian holds no account named {user.user_name}: a stale record of that email may hold "
                "it; remove it in Atlassian administration, then run again")
    return f"read again, the account {held['id']} holds userName {user.user_name}"


def _read_group(display_name: str, reads: _Reads, holders: dict[str, str]) -> str:
    held = next((g for g in reads.groups.values() if name_key(g.get("displayName") or "") == name_key(display_name)), None)
    if held is not None and held["id"] in holders:
        return (f"the name {display_name!r} is held by the group guardsync manages for Entra group {holders[held['id']]}; "
                "it is taken once that group is renamed or deleted")
    if held is None:
        return f"read again, Atlassian holds no group named {display_name!r}"
    return f"read again, the group {held['id']} holds the name {display_name!r}"


Change = TypeVar("Change", UserChange, GroupChange)


def _waves(changes: list[Change]) -> list[list[Change]]:
    """The plan's waves in order: each runs once the one before it is done."""
    by_wave: dict[int, list[Change]] = {}
    for change in changes:
        by_wave.setdefault(change.wave, []).append(change)
    return [by_wave[wave] for wave in sorted(by_wave)]
