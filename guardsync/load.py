"""Apply a plan to Atlassian through the SCIM client, recording each write as it succeeds.

Safe to re-run at any point: a retried load (same flow run) skips what the audit
shows this run already wrote; a create whose earlier attempt reached Atlassian but
not the store answers 409 and is adopted (looked up by userName or displayName),
so nothing is ever duplicated.

User writes and member PATCHes are recorded a batch at a time (RECORD_EVERY writes,
and whatever is left when a stage ends), in one transaction: one transaction a write
was a third of a write's client CPU. A kill loses the records of at most one batch,
and the re-run converges as above (creates are adopted, updates and PATCHes repeat
harmlessly). Group creates, renames and deletes are recorded one by one.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from guardsync.errors import ApiError, Conflict, NotFound
from guardsync.models import DesiredUser
from guardsync.changes import PAST, GroupChange, MemberChange, UserChange
from guardsync.scim import ScimClient
from guardsync.state import StateStore
from guardsync.throttle import AdaptiveLimit

RECORD_EVERY = 100  # writes recorded in one transaction
# Threads a stage runs beyond write_concurrency: while `write_concurrency` requests are out at
# Atlassian (the limit holds that), the spares prepare the next requests and read the answers,
# so the client's own work never leaves a slot empty.
SPARE_THREADS = 4
# Audit operations that mean "this object is done for this run" (a retried load skips it).
USER_OPERATIONS = ("create", "recreate", "update", "deactivate", "reactivate", "adopt", "handover")
GROUP_OPERATIONS = ("create", "adopt", "adopt_existing", "rename", "delete")
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


class Loader:
    """One run's writes: users, then groups, then memberships."""

    def __init__(self, scim: ScimClient, store: StateStore, run_id: str, concurrency: int = 4,
                 on_progress: Callable[[str, int, int], None] | None = None):
        self.scim = scim
        self.store = store
        self.run_id = run_id
        self.concurrency = concurrency
        self.report = LoadReport()
        self.on_progress = on_progress or (lambda stage, done, total: None)
        # Called with a renamed group's Entra id once its re-created group holds the members and before the
        # old group is deleted: product access moves to the new group first ([access], AccessLoader.grant_renamed).
        self.before_rename_delete: Callable[[str], None] | None = None
        # Applied in Atlassian, not yet in the store: (operation, scim id, user), (group id, added, removed).
        self._users_to_record: list[tuple[str, str, DesiredUser]] = []
        self._members_to_record: list[tuple[str, list[str], list[str]]] = []
        self._record_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------
    def _each(self, stage: str, items: list[T], apply: Callable[[T], None], describe: Callable[[T], str]) -> None:
        """Apply every item with a few threads; a 4xx on one item is recorded and the rest go on."""
        done = 0

        def tick() -> None:  # report from the caller's thread, where the Prefect run context lives
            nonlocal done
            done += 1
            if done % RECORD_EVERY == 0:
                self._record()
            if done % 200 == 0 or done == len(items):
                self.on_progress(stage, done, len(items))

        self.scim.limit = AdaptiveLimit(self.concurrency)  # a 429 halves the requests in flight

        def one(item: T) -> None:
            try:
                apply(item)
            except ApiError as exc:  # Atlassian refused this object: show its words, keep going
                name = describe(item)
                self.report.fail(f"{stage} {name}: {exc}")
                self.store.record_failure(self.run_id, stage, stage.rstrip("s"), name, None, str(exc))

        try:
            if self.concurrency <= 1 or len(items) <= 1:
                for item in items:
                    one(item)
                    tick()
                return
            pool = ThreadPoolExecutor(self.concurrency + SPARE_THREADS, thread_name_prefix=f"load-{stage}")
            try:
                for future in as_completed([pool.submit(one, item) for item in items]):
                    future.result()  # re-raises a fatal error (auth, transient after retries) here
                    tick()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self._record()  # whatever landed, even when the stage fails

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
    def load_users(self, changes: Iterable[UserChange], forget: Iterable[str] = ()) -> None:
        """Forget the accounts deleted by hand whose users left, then write the changes wave by wave
        (a change that takes an identifier runs after the one that gives it up)."""
        changes, forget = list(changes), list(forget)
        if not changes and not forget:
            return  # nothing to do: not even a read of the state
        applied = self.store.load()
        if forget:
            self.store.forget_users(self.run_id, [u for u in forget if u in applied.users])
            self.report.count("users_gone", len(forget))
        done = self.store.done_in_run(self.run_id, USER_OPERATIONS)
        managed = {user.scim_id: uid for uid, user in applied.users.items()}
        # A released account is written again on a retry (the same PUT): its user's id is done by then.
        for wave in _waves([c for c in changes if c.release or c.user.external_id not in done]):
            self._each("users", wave, lambda c: self._apply_user(c, managed), lambda c: c.user.user_name)

    def _apply_user(self, change: UserChange, managed: dict[str, str]) -> None:
        user = change.user
        if change.scim_id is None:
            _, operation = self._create_user(user, managed)
            if operation == "adopt":  # a delta run found the account at write time (409)
                self.report.count("users_adopted")
            else:
                self._count_user(change)
            return
        if change.release:  # an old account left behind: deactivated, and recorded for no one
            try:
                self.scim.replace_user(change.scim_id, user)
            except NotFound:
                pass  # deleted by hand meanwhile: the goal is reached
            self.store.note(self.run_id, "release", "user", change.handed_from, user.user_name,
                            json.dumps({"scim_id": change.scim_id, "deactivated": True}))
            self._count_user(change)
            return
        try:
            if change.write:
                self.scim.replace_user(change.scim_id, user)
        except NotFound:  # deleted in Atlassian by hand meanwhile
            self._account_gone(change, managed)
            return
        if change.handed_from:  # the account passes to this Entra user; the old id no longer maps to it
            self._record()
            self.store.hand_over(self.run_id, change.handed_from, change.scim_id, user)
        else:
            self._user_written(_user_operation(change), change.scim_id, user)
        self._count_user(change)

    def _account_gone(self, change: UserChange, managed: dict[str, str]) -> None:
        """An account deleted by hand: an enabled user in scope gets a new one, in the groups it was in
        (drift); a leaver is recorded as gone, never created again."""
        user = change.user
        if change.handed_from:
            self.store.forget_users(self.run_id, [change.handed_from])
        if not user.active:
            self.store.forget_users(self.run_id, [user.external_id])
            self.report.count("users_gone")
            return
        scim_id, _ = self._create_user(user, managed, "recreate")
        self.report.count("users_created")
        if not change.adopted and not change.handed_from:
            self._rejoin_groups(user.external_id, scim_id)

    def _create_user(self, user: DesiredUser, managed: dict[str, str], operation: str = "create") -> tuple[str, str]:
        """(SCIM id, audit operation): POST, or on 409 adopt the account unless another Entra user holds it."""
        try:
            created = self.scim.create_user(user)
        except Conflict:  # exists already (made by hand meanwhile, or by an earlier attempt): take it over
            existing = self.scim.find_user(user_name=user.user_name)
            if existing is None:
                raise
            holder = managed.get(existing["id"])
            if holder is not None and holder != user.external_id:
                raise Conflict(f"userName {user.user_name} is held by the account guardsync manages for Entra user "
                               f"{holder}; it is handed over once that user gives the identifier up") from None
            created = self.scim.replace_user(existing["id"], user)
            operation = "adopt"
        self._user_written(operation, created["id"], user)
        return created["id"], operation

    def _count_user(self, change: UserChange) -> None:
        for key in change.count_keys():
            self.report.count(key)

    def _rejoin_groups(self, user_id: str, scim_id: str) -> None:
        """A re-created account has a new SCIM id: put it back in the managed groups the state says it is in."""
        self._record()
        state = self.store.load()
        for group_id, members in state.members.items():
            if user_id in members and group_id in state.groups:
                self.scim.patch_members(state.groups[group_id].scim_id, [scim_id], [])
                self.store.note(self.run_id, "rejoin", "group", group_id, state.groups[group_id].display_name,
                                json.dumps({"added": [user_id]}))

    # -- groups ----------------------------------------------------------------------
    def load_groups(self, changes: Iterable[GroupChange], member_changes: Iterable[MemberChange],
                    forget: Iterable[str] = ()) -> None:
        """Create, rename, adopt and delete groups, wave by wave (a name is taken after it is freed);
        renamed groups get their members here, new and adopted ones in load_members."""
        changes, forget = list(changes), list(forget)
        if not changes and not forget:
            return
        applied = self.store.load()
        for group_id in forget:
            if group_id in applied.groups:
                self.store.drop_group(self.run_id, group_id, applied.groups[group_id].display_name, operation="gone")
        done = self.store.done_in_run(self.run_id, GROUP_OPERATIONS)
        # A created or renamed group starts empty in the plan: its adds are all its members.
        members_of = {change.group_id: frozenset(change.add) for change in member_changes}
        managed = {group.scim_id: gid for gid, group in applied.groups.items()}
        for wave in _waves([c for c in changes if c.group_id not in done]):
            self._each("groups", wave, lambda c: self._apply_group(c, applied, members_of, managed), lambda c: c.display_name)

    def _apply_group(self, change: GroupChange, applied, members_of: dict[str, frozenset[str]], managed) -> None:
        before = applied.groups.get(change.group_id)
        if change.kind == "delete":
            self._delete_group(before.scim_id)
            self.store.drop_group(self.run_id, change.group_id, change.display_name)
            self.report.count("groups_deleted")
            return
        if change.kind == "adopt":  # planned from the observation: it is ours now, matched by Entra id
            self.scim.set_group_external_id(change.scim_id, change.group_id)
            self.store.save_group(self.run_id, "adopt", change.group_id, change.scim_id, change.display_name,
                                  members=change.members)
            self.report.count("groups_adopted")
            return
        scim_id, adopted, current = self._create_group(change.display_name, change.group_id, managed)
        members = None
        if change.kind == "rename" or adopted:
            # Atlassian refuses renames, so the new group takes the members before the old one
            # goes; an adopted group's members become exactly ours, whoever else was in it.
            target = members_of.get(change.group_id, frozenset())
            members = self._make_members_exact(scim_id, target, current, applied.users)
        if change.kind == "rename":
            if self.before_rename_delete is not None:
                self.before_rename_delete(change.group_id)
            self._delete_group(before.scim_id)
        # "adopt_existing": found at write time (409), its members made exact here, not in load_members
        self.store.save_group(self.run_id, "adopt_existing" if adopted else change.kind, change.group_id, scim_id,
                              change.display_name)
        if members is not None:
            self.store.save_members(self.run_id, [(change.group_id, members, [])])
        self.report.count("groups_adopted" if adopted else f"groups_{PAST[change.kind]}")

    def _create_group(self, display_name: str, group_id: str, managed: dict[str, str]) -> tuple[str, bool, set[str]]:
        """(scim id, adopted?, scim ids of the members it already has)."""
        try:
            return self.scim.create_group(display_name, group_id)["id"], False, set()
        except Conflict:
            existing = self.scim.find_group(display_name)
            if existing is None:
                raise
            holder = managed.get(existing["id"])
            if holder is not None and holder != group_id:
                raise Conflict(f"the name {display_name!r} is held by the group guardsync manages for Entra group "
                               f"{holder}; it is taken once that group is renamed or deleted") from None
            if existing.get("externalId") != group_id:
                self.scim.set_group_external_id(existing["id"], group_id)  # it is ours now: match it by Entra id
            return existing["id"], True, {member["value"] for member in existing.get("members") or []}

    def _make_members_exact(self, group_scim_id: str, members: frozenset[str], current: set[str], users) -> list[str]:
        """PATCH a group to exactly `members` (Entra ids); returns the Entra ids now in it."""
        wanted = {users[u].scim_id: u for u in members if u in users}
        add = [s for s in wanted if s not in current]
        remove = [s for s in current if s not in wanted]
        if add or remove:
            self.scim.patch_members(group_scim_id, add, remove)
        self.report.count("members_added", len(add))
        self.report.count("members_removed", len(remove))
        return sorted(wanted.values())

    def _delete_group(self, scim_id: str) -> None:
        try:
            self.scim.delete_group(scim_id)
        except NotFound:
            pass  # already gone: the goal is reached

    # -- memberships -------------------------------------------------------------------
    def load_members(self, changes: Iterable[MemberChange]) -> None:
        changes = list(changes)
        if not changes:
            return
        applied = self.store.load()
        # renamed, or adopted at write time: members set in load_groups
        done = self.store.done_in_run(self.run_id, ("members", "rename", "adopt_existing"))
        work = []
        for change in changes:
            group = applied.groups.get(change.group_id)
            if group is None or change.group_id in done:
                continue  # its create failed (reported there), or this run already set its members
            work.append((change.group_id, group.scim_id, list(change.add), list(change.remove)))
        # A group's PATCHes go one after the other (up to 220 of them for a 22k-member group):
        # the longest chains start first, so the stage does not end waiting on one of them.
        work.sort(key=lambda w: len(w[2]) + len(w[3]), reverse=True)
        self._each("members", work, lambda w: self._patch(*w, scim_ids=applied), lambda w: w[0])

    def remove_foreign_members(self, foreign: dict[str, tuple[str, ...]]) -> None:
        """Take accounts guardsync does not manage out of its groups (found by the observation):
        people added by hand to a managed group, and other members of an adopted one."""
        if not foreign:
            return
        groups = self.store.load().groups
        done = self.store.done_in_run(self.run_id, ("remove_foreign",))
        for group_id, scim_ids in foreign.items():
            if group_id in groups and group_id not in done:
                self.scim.patch_members(groups[group_id].scim_id, [], list(scim_ids))
                self.store.note(self.run_id, "remove_foreign", "group", group_id, groups[group_id].display_name,
                                f"removed {len(scim_ids)} members added by hand: {', '.join(scim_ids[:20])}")
                self.report.count("members_removed", len(scim_ids))

    def _patch(self, group_id: str, group_scim_id: str, add: list[str], remove: list[str], scim_ids) -> None:
        users = scim_ids.users
        add = [u for u in add if u in users]  # a user whose create failed cannot join yet
        remove_scim = [users[u].scim_id for u in remove if u in users]
        self.scim.patch_members(group_scim_id, [users[u].scim_id for u in add], remove_scim)
        self._members_written(group_id, add, remove)
        self.report.count("members_added", len(add))
        self.report.count("members_removed", len(remove))


def _user_operation(change: UserChange) -> str:
    """The audit operation of a user write ("adopt" for every adoption, whatever else it changed)."""
    return "adopt" if change.adopted else change.kind


Change = TypeVar("Change", UserChange, GroupChange)


def _waves(changes: list[Change]) -> list[list[Change]]:
    """The plan's waves in order: each runs once the one before it is done."""
    by_wave: dict[int, list[Change]] = {}
    for change in changes:
        by_wave.setdefault(change.wave, []).append(change)
    return [by_wave[wave] for wave in sorted(by_wave)]

