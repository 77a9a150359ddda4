"""The bookkeeping of one run of a directory, around its stages: lock, run record, mirror, settled mark.

    run = DirectoryRun(store, run_id, dry_run)
    try:
        run.enter()                   # the directory lock (renewed by a heartbeat) and the run record
        mirror = run.mirror           # links, columns, generation: what a delta round needs
        run.snapshot()                # the Entra snapshot the extract merges into, read when needed
        ... extract ...
        run.keep_mirror(extracted)    # the new snapshot and delta links, never over newer ones
        if run.is_settled(digest): ...  # nothing changed since a completed run with these settings
        run.unsettle(); ... the stages ...; run.settle(digest)
    finally:
        run.finish(status, counts, message)   # the run record closed, the lock released: every exit path

A dry run takes no lock and records nothing: it only reads the mirror.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

from guardsync.errors import GuardsyncError
from guardsync.gates import expectations_dir
from guardsync.models import Snapshot, content_digest
from guardsync.state import LOCK_LEASE, DirectoryBusy, Mirror, StateStore, WaitingForApproval

log = logging.getLogger(__name__)


class StaleRetry(GuardsyncError):
    """A retried run whose directory ran again since it started: its kept extract and plan are out of date."""


def guardsync_version() -> str:
    try:
        return version("guardsync")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def settled_digest(settings: dict, allow_mass_deactivation: bool) -> str:
    """What a completed run's outcome depends on besides Entra: the settings, the gates' suites (their
    content, as the README has operators edit them) and guardsync's version."""
    suites = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
              for path in sorted(expectations_dir().glob("*.json"))}
    return content_digest({"settings": settings, "allow": allow_mass_deactivation, "suites": suites,
                           "guardsync": guardsync_version()})


class DirectoryRun:
    """One run's hold on its directory's state, with a lifecycle: enter, (settle), finish."""

    def __init__(self, store: StateStore, run_id: str, dry_run: bool, lease: timedelta = LOCK_LEASE,
                 heartbeat_every: timedelta | None = None):
        self.store, self.run_id, self.dry_run, self.mode = store, run_id, dry_run, "dry-run" if dry_run else "sync"
        self.lease = lease
        self.heartbeat_every = heartbeat_every or lease / 4
        self.mirror = Mirror(None, {}, None, 0)
        self.locked = self.recorded = False
        self.lost_lock = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- enter ---------------------------------------------------------------------------------
    def enter(self) -> None:
        """Take the directory lock (DirectoryBusy when another run holds it), record the run, read the mirror.

        A retried run (the same run id) whose directory ran again after it started stops here (StaleRetry):
        the extract and plan it kept describe a directory that has moved on."""
        if not self.dry_run:
            try:
                self.store.acquire_lock(self.run_id, self.lease)
            except DirectoryBusy as busy:
                holder = self.store.lock_holder_run()
                held = self.store.held_plan(holder) if holder else None
                if held is not None and held["status"] == "waiting":
                    raise WaitingForApproval(
                        f"run {holder} waits for a person to approve or reject its plan (held since "
                        f"{held['held_at']:%Y-%m-%d %H:%M} UTC): this run did nothing; answer it in the Prefect UI "
                        "(that run's Resume button)") from busy
                raise
            self.locked = True
            self._start_heartbeat()
            later = self.store.start_run(self.run_id, self.mode)
            self.recorded = True
            if later is not None:
                raise StaleRetry(
                    f"this is a retry of run {self.run_id}, and the directory ran again since it started (run "
                    f"{later['run_id']}, {later['started_at']:%Y-%m-%d %H:%M:%S} UTC, {later['status']}): its kept "
                    f"extract and plan are out of date and are not applied; start a new run instead of retrying this one"
                )
        self.mirror = self.store.load_mirror(snapshot=False)  # a quiet run never decodes the snapshot

    def snapshot(self) -> Snapshot | None:
        """The mirror's snapshot (None before the first full read), read from the store on first use."""
        if self.mirror.snapshot is None and self.mirror.user_columns is not None:
            self.mirror = self.mirror._replace(snapshot=self.store.load_snapshot())
        return self.mirror.snapshot

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._renew, name=f"lock-heartbeat-{self.run_id[:8]}", daemon=True)
        self._heartbeat.start()

    def _renew(self) -> None:
        """Renew the lease while the run lives; a process that dies stops renewing, and its lease runs out."""
        while not self._stop.wait(self.heartbeat_every.total_seconds()):
            try:
                if not self.store.renew_lock(self.run_id, self.lease):
                    self.lost_lock = True
                    log.error("run %s lost the directory lock (its lease ran out and another run took it)", self.run_id)
                    return
            except Exception as exc:  # the database hiccuped: try again at the next beat, the lease has slack
                log.warning("could not renew the directory lock (%s); trying again", type(exc).__name__)

    def check_lease(self) -> None:
        """Before a batch of writes: stop (DirectoryBusy) if another run took the directory over. The heartbeat
        may have seen it already; else the lock row says it (a frozen worker's lease runs out unrenewed)."""
        if self.dry_run or not self.locked:
            return
        if self.lost_lock or not self.store.holds_lock(self.run_id):
            self.lost_lock = True
            raise DirectoryBusy(f"run {self.run_id} lost the directory lock while it ran (its lease of {self.lease} ran "
                                "out and another run took the directory): it stopped before its next write; run it "
                                "again once that run is done")

    # -- the mirror ------------------------------------------------------------------------------
    def keep_mirror(self, snapshot: Snapshot, links: dict, full: bool, changed: bool, based_on: int) -> None:
        """Save what the extract read: the merged snapshot when it changed, else Graph's new delta links.
        `based_on` is the mirror generation the extract started from: an extract a retry kept from before is
        never saved over a newer mirror."""
        if self.dry_run:
            return
        if changed:
            saved = self.store.save_mirror(snapshot, links, full, based_on)
        elif links != self.mirror.links:
            saved = self.store.save_links(links, based_on, self.mirror.user_columns)
        else:
            return
        if not saved:
            log.info("the mirror moved on since this run's extract (generation %d): kept as it is", based_on)

    # -- the settled mark ------------------------------------------------------------------------
    def is_settled(self, digest: str) -> bool:
        return not self.dry_run and self.store.is_settled(digest)

    def unsettle(self) -> None:
        """From before a run writes until it completes: a failed run is never skipped over."""
        if not self.dry_run:
            self.store.settle(None)

    def settle(self, digest: str) -> None:
        """The run completed: the next run with no change in Entra can stop after the read."""
        if self.dry_run:
            return
        if self.lost_lock:
            raise DirectoryBusy(f"run {self.run_id} lost the directory lock while it ran (its lease of "
                                f"{self.lease} ran out); run it again")
        self.store.settle(digest)

    # -- finish ------------------------------------------------------------------------------------
    def finish(self, status: str, counts: dict | None = None, message: str | None = None) -> None:
        """Close the run record and release the lock, whatever happened (each only if this run took it)."""
        self._stop.set()
        try:
            if self.recorded:
                self.store.finish_run(self.run_id, status, counts, message)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.join()
            if self.locked:
                self.store.release_lock(self.run_id)
                self.locked = False
            self.store.dispose()

