"""The sync-directory flow: Entra ID -> gates -> Atlassian SCIM, one thin composition of stage tasks.

extract -> flatten -> scope -> validate (users, groups, memberships gates) -> plan (+ guards)
  -> [access: plan-access (+ gate, guards)] -> load users -> load groups -> load memberships
  -> [access: load access] -> summary
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import opaque

# What a quiet run needs is imported here; the stages, in the functions that run them: a run that
# finds no change in Entra never loads them (a process's start-up is most of a quiet run's CPU).
from guardsync.admin import AdminClient, directory_id_of
from guardsync.config import Settings, resolve_secret
from guardsync.errors import GuardsyncBlocked, GuardsyncError, TransientError
from guardsync.models import user_columns
from guardsync.graph import DeltaLinks, GraphChanges, GraphClient
from guardsync.run import DirectoryRun, settled_digest
from guardsync.scim import ScimClient
from guardsync.state import Mirror, StateStore, WaitingForApproval
from guardsync.summary import SUMMARY_LOG_MARK, RunSummary
from guardsync.text import plain
from flows.prune_quiet_runs import tag_quiet_run
from tasks.load import TERMINAL_PROGRESS
from tasks.results import keep_results_private

if TYPE_CHECKING:
    from tasks.extract import Extracted

os.environ.setdefault("DO_NOT_TRACK", "1")  # the flow never phones home, wherever it runs
NOTHING_TO_DO = "no change in Entra since the last completed run with these settings: nothing to do"
DRY_RUN_ROWS = 50  # changes a dry run prints (all of them, up to 500: the plan-changes artifact)


class WritesFailed(GuardsyncError):
    """The run finished, but Atlassian refused some writes (listed in the summary)."""

    def __init__(self, summary: RunSummary):
        super().__init__(f"{len(summary.failures)} writes failed; see the summary and fix the objects named there")
        self.summary = summary


def full_read_due(last_full: datetime | None, every_hours: float) -> bool:
    """A periodic full read catches anything a delta round could have missed."""
    return last_full is None or datetime.now(timezone.utc) - last_full >= timedelta(hours=every_hours)


def prefect_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def resolve(reference: str | None, key: str) -> str | None:
    return resolve_secret(reference, key, prefect_secret) if reference else None


def connect(settings: Settings, dry_run: bool) -> tuple[GraphClient, ScimClient, StateStore]:
    """Build the run's clients; secrets are resolved here, in memory, never passed as parameters."""
    entra, atlassian, sync = settings.entra, settings.atlassian, settings.sync
    budget = dict(max_retry_seconds=sync.retry_budget_seconds, read_timeout=sync.request_timeout_seconds)
    graph = GraphClient(
        tenant_id=entra.tenant_id,
        client_id=entra.client_id,
        client_secret=resolve(entra.client_secret, "entra.client_secret"),
        certificate_path=entra.certificate_path,
        authority_host=entra.authority_host,
        graph_url=entra.graph_url,
        **budget,
    )
    graph.on_progress = TERMINAL_PROGRESS
    scim = ScimClient(atlassian.scim_url, resolve(atlassian.api_key, "atlassian.api_key"), dry_run=dry_run, **budget)
    state_url = settings.sync.state
    if state_url.startswith(("env:", "prefect:")):
        state_url = resolve(state_url, "sync.state")
    return graph, scim, StateStore(state_url, read_only=dry_run)  # a dry run writes nothing anywhere


def connect_admin(settings: Settings, dry_run: bool) -> AdminClient | None:
    """The Organizations API client, only with [access]: without it no request goes there at all."""
    access = settings.access
    if access is None:
        return None
    return AdminClient(access.admin_url, access.org_id, directory_id_of(settings.atlassian.scim_url),
                       resolve(access.api_key, "access.api_key"), dry_run=dry_run)


# The flow's own result (the summary) is not persisted: a retry needs only its stages' results.
@flow(name="sync-directory", persist_result=False, log_prints=True)
def sync_directory(
    settings: Settings,
    dry_run: bool = False,
    full: bool = False,
    allow_mass_deactivation: bool = False,
    approve_run: str | None = None,
    approval_reason: str = "",
) -> dict:
    """One run: read Entra ID, gate, plan, and (unless dry_run) apply to Atlassian.

    `approve_run`: apply the plan that run held (a guard blocked it), if the plan made now is that very plan
    (`guardsync approve`); `approval_reason` goes into the audit with it."""
    keep_results_private(settings.sync.results_keep_days)
    graph, scim, store = connect(settings, dry_run)
    admin = connect_admin(settings, dry_run)
    run = DirectoryRun(store, str(runtime.flow_run.id), dry_run)
    quiet = False  # nothing changed in Entra and the directory is settled: the run ends after the read
    summary = RunSummary(run_id=run.run_id, mode=run.mode, status="running", identifier=settings.sync.identifier)
    try:
        run.enter()  # one run per directory at a time (DirectoryBusy otherwise); a stale retry stops here
        mirror = run.mirror
        if approve_run:  # read Entra and Atlassian as the run that held the plan did, to make it again
            held = store.held_plan(approve_run)
            full = full or bool(held and held["full_read"])
        needed = user_columns(settings.attributes.sources())
        full_read = (full or mirror.user_columns is None
                     or full_read_due(mirror.last_full_read, settings.sync.full_read_every_hours)
                     or not set(needed) <= set(mirror.user_columns))  # newly mapped: the mirror lacks it
        settled = settled_digest(settings.model_dump(mode="json"), allow_mass_deactivation)
        changes = None if full_read or approve_run or not run.is_settled(settled) else quick_look(graph, mirror)
        unchanged = changes is not None and changes.is_empty  # Entra: nothing since a completed run
        # With [access], the configured groups must still hold their products too (one role-assignments read
        # a configured group): a hand revocation is repaired by this run, as the dry run (never quiet) says.
        if unchanged and products_hold(admin, store):  # the fast cadence's usual run: no task, no artifact
            quiet = True
            store.check_binding(changes.tenant_id, settings.atlassian.scim_url)
            run.keep_mirror(None, asdict(changes.links), False, False, mirror.generation)
            summary.last_full_read = mirror.last_full_read.isoformat(timespec="seconds")
            summary.message = NOTHING_TO_DO
        else:
            from guardsync.gates import warm_up_in_background
            from tasks.extract import extract

            if full_read:  # a full read waits seconds on Graph, and the gates follow: make GX ready meanwhile
                warm_up_in_background()
            extracted = extract(graph, None if full_read else run.snapshot(),
                                None if full_read else DeltaLinks(**mirror.links), mirror.generation, needed,
                                opaque(changes))
            store.check_binding(extracted.snapshot.tenant_id, settings.atlassian.scim_url)
            run.keep_mirror(extracted.snapshot, asdict(extracted.links), extracted.full, extracted.changed, extracted.based_on)
            summary.last_full_read = (datetime.now(timezone.utc) if extracted.full else mirror.last_full_read).isoformat(timespec="seconds")
            if (not approve_run and not extracted.changed and not unchanged and run.is_settled(settled)
                    and products_hold(admin, store)):
                summary.message = NOTHING_TO_DO
            else:
                run.unsettle()  # until this run completes
                reconcile(summary, extracted, settings, graph, scim, store, dry_run, allow_mass_deactivation, admin,
                          check_lease=run.check_lease, approve_run=approve_run, approval_reason=approval_reason)
        summary.requests = {"graph": sum(graph.requests_made.values()), "scim": sum(scim.requests_made.values())}
        if admin is not None:
            summary.requests["organizations"] = sum(admin.requests_made.values())
        summary.status = "completed" if not summary.failures else "failed"
        if summary.status == "completed":
            run.settle(settled)
    except WaitingForApproval as exc:
        from tasks.approval import deployed

        if not deployed():  # a command-line run says so, and exits 1
            summary.status, summary.message = "failed", str(exc)
            raise
        # A scheduled run while another waits for its approval: nothing to do, and nothing to alert on.
        summary.status, summary.message, quiet = "waiting", str(exc), True
    except GuardsyncBlocked as exc:
        summary.status, summary.message = "blocked", str(exc)
        summary.held_run = getattr(exc, "held_run", None) or ""
        exc.run_summary = summary  # the command line ends a blocked run with its summary too
        raise
    except Exception as exc:
        summary.status, summary.message = "failed", str(exc) if isinstance(exc, GuardsyncError) else type(exc).__name__
        with suppress(AttributeError, TypeError):
            exc.flow_run_id = run.run_id  # the command line says where the details are
            exc.run_summary = summary  # and ends a failed run with its summary
        raise
    finally:
        publish_summary(summary, quiet)
        run.finish(summary.status, summary.counts, summary.message or None)
    if summary.failures:
        raise WritesFailed(summary)
    return summary.as_dict()


def reconcile(summary: RunSummary, extracted: Extracted, settings: Settings, graph: GraphClient, scim: ScimClient,
              store: StateStore, dry_run: bool, allow_mass_deactivation: bool, admin: AdminClient | None = None,
              check_lease: Callable[[], None] = lambda: None, approve_run: str | None = None,
              approval_reason: str = "") -> None:
    """Scope, gate, plan and (unless dry_run) load one snapshot; fills the summary as it goes. `check_lease`
    raises when the run no longer holds its directory: called before each batch of writes. A plan an approvable
    guard holds is applied only as approved (tasks/approval.py)."""
    from guardsync.access_load import AccessLoader
    from guardsync.changes import blocked_by
    from guardsync.diff import plan_row_count, plan_rows
    from guardsync.load import Loader
    from tasks.access import load_access, plan_access
    from tasks.approval import holds_of, settle_holds
    from tasks.flatten import flatten
    from tasks.load import load_groups, load_memberships, load_users
    from guardsync.plan import PlanInputs, facts_needed
    from tasks.observe import look_up_atlassian, observe_atlassian
    from tasks.plan import foresee_writes, plan_changes
    from tasks.scope import scope_users
    from tasks.validate import validate_gates

    snapshot, run_id = extracted.snapshot, summary.run_id
    scoped = scope_users(snapshot, flatten(snapshot), settings.sync, settings.attributes)
    summary.excluded = dict(scoped.excluded)
    validated = validate_gates(scoped, settings.sync)
    summary.quarantined = validated.quarantined_by_rule()
    summary.values_left_out = dict(validated.values_left_out)
    summary.quarantined_examples = [
        f"{row.identifier or '(none)'} [{row.id}] ({row.rule})" for row in validated.quarantined.head(20).itertuples()
    ]
    recorded = store.load()
    first_run = not recorded.users and not recorded.groups
    summary.first_sync = not dry_run and first_run
    observation, needed = None, []
    # Plan against Atlassian as it is: on first runs, full reads, and after an observing run that
    # did not finish (what it adopted was not all recorded). Delta runs plan from the record, and
    # look up the few facts it lacks (a disabled newcomer's account); writes that meet 404/409
    # are planned again by the loader, with the same planner.
    if extracted.full or first_run or store.observation_pending():
        observation = observe_atlassian(scim, opaque(recorded))
        summary.drift = observation.drift.lines()
    elif needed := facts_needed(validated.users, recorded, store.load_no_account()):
        observation = look_up_atlassian(scim, opaque(recorded), opaque(needed))
    # opaque(): Prefect would otherwise walk every object of these large inputs looking for futures.
    # The deactivation guard of a first run counts the accounts it adopts, also when it is re-run after
    # stopping midway (some adoptions recorded, the rest not): as the uninterrupted run would.
    plan = plan_changes(opaque(validated), opaque(recorded), opaque(observation), settings.sync, allow_mass_deactivation,
                        first_run or not store.completed_a_sync())
    summary.excluded["disabled_never_synced"] = plan.not_created_disabled
    summary.handovers = [handover.line() for handover in plan.handovers]
    access_plan = None
    if admin is not None:  # before any write: unknown products, the access gate and guards stop the run here
        access_plan = plan_access(admin, settings.access, opaque(validated), opaque(recorded), opaque(observation),
                                  opaque(plan), opaque(store.load_grants()))
    if dry_run and (observation is None or not observation.complete):
        # A delta plan: the sync meets what was changed by hand when its writes answer 404 or 409; the dry run,
        # which writes nothing, reads those objects instead, and shows the plan the sync's loader will follow.
        granted = [grant.group_id for grant in access_plan.later_grants()] if access_plan is not None else []
        if (foreseen := foresee_writes(scim, store, opaque(validated), opaque(plan), granted, opaque(needed),
                                       settings.sync.write_concurrency)) is not None:
            plan = foreseen
            if admin is not None:
                access_plan = plan_access(admin, settings.access, opaque(validated), opaque(recorded),
                                          opaque(observation), opaque(plan), opaque(store.load_grants()))
    if access_plan is not None:
        summary.access = access_plan.lines(granting=bool(access_plan.grants))
    planned = plan.counts() | (access_plan.counts() if access_plan is not None else {})
    if dry_run:
        if holds := holds_of(plan, access_plan):  # as the sync would be, before it asks anyone: every guard tripped
            raise blocked_by(holds)
        summary.counts = planned
        summary.plan_changes = plan_rows(plan, validated, recorded, observation, limit=DRY_RUN_ROWS)
        summary.planned_changes = plan_row_count(plan)
    else:
        # Before any write: a plan an approvable guard holds goes on only as a person approved it.
        approval = settle_holds(plan, access_plan, store=store, run_id=run_id, full_read=extracted.full, counts=planned,
                                timeout_hours=settings.sync.approval_timeout_hours, approve_run=approve_run,
                                reason=approval_reason)
        if approval is not None:
            summary.approval = approval.line()
        store.bind(snapshot.tenant_id, settings.atlassian.scim_url)
        if observation is not None and observation.complete:
            store.set_observation_pending(True)
        loader = Loader(scim, store, run_id, PlanInputs.of(validated), settings.sync.write_concurrency)
        loader.check_lease = check_lease
        access_loader = AccessLoader(admin, store, run_id, access_plan) if access_plan is not None else None
        if access_loader is not None:  # a renamed group's new group gets its products before the old one goes
            loader.before_rename_delete = access_loader.grant_renamed
            access_loader.restore_groups = loader.restore_groups  # a group deleted by hand is re-created to be granted
        stages = [lambda: load_users(loader, opaque(plan)), lambda: load_groups(loader, opaque(plan)),
                  lambda: load_memberships(loader, opaque(plan))]
        if access_loader is not None:
            stages.append(lambda: load_access(access_loader))
        for stage in stages:
            check_lease()  # a run that lost its directory writes nothing more
            result = stage()
            for key, value in result["counts"].items():
                summary.counts[key] = summary.counts.get(key, 0) + value
            summary.failures += result["failures"]
        if observation is not None and observation.complete and not summary.failures:
            store.set_observation_pending(False)
        if approval is not None and not summary.failures:
            store.decide_plan(approval.held_run, "applied", applied_by=run_id, audit_run=run_id)
    with_products = access_plan.configured if access_plan is not None else frozenset()
    summary.new_groups = sorted(validated.groups[c.group_id].display_name for c in plan.groups
                                if c.kind == "create" and c.group_id not in with_products)
    # With [access], every renamed group's grants move to its new group: none needs granting again by hand.
    summary.renamed_groups = [] if access_plan is not None else sorted(c.display_name for c in plan.groups
                                                                       if c.kind == "rename")


def products_hold(admin: AdminClient | None, store: StateStore) -> bool:
    """Without [access], nothing to look at (and the access loader is never imported)."""
    if admin is None:
        return True
    from guardsync.access_load import access_holds

    return access_holds(admin, store)


def quick_look(graph: GraphClient, mirror: Mirror) -> GraphChanges | None:
    """The fast cadence's read of a settled directory: one delta round, outside any task (a task run, and
    its persisted result, for every minute's run would be most of what a quiet run costs). Changes found
    go to the extract task as read; None (a hiccup Graph's own retries did not heal) lets the extract
    task read again, with its retries."""
    try:
        return graph.read_changes(DeltaLinks(**mirror.links), list(mirror.user_columns))
    except TransientError as exc:
        get_run_logger().warning("the quick look at Entra failed (%s); reading in the extract task", exc)
        return None


def publish_summary(summary: RunSummary, quiet: bool = False) -> None:
    """The run's log ends with the summary (a worker's terminal, the UI's logs); the artifact has it as tables.
    A quiet run (no change in Entra) logs one line instead, makes no artifact, and is tagged for the retention
    of quiet runs: every row it adds to Prefect's database is multiplied by 1,440 a day on the fast cadence."""
    if quiet and summary.status == "waiting":  # another run waits for its approval: this one did nothing
        get_run_logger().info(plain(summary.message))
        tag_quiet_run()
        return
    if quiet and summary.status == "completed":
        get_run_logger().info(f"{summary.message} ({summary.requests.get('graph', 0)} Graph requests; last full read "
                              f"{summary.last_full_read})", extra={SUMMARY_LOG_MARK: True})
        tag_quiet_run()
        return
    get_run_logger().info("\n".join(summary.lines()), extra={SUMMARY_LOG_MARK: True})
    create_markdown_artifact(key="summary", markdown=summary.markdown(), description=f"guardsync {summary.mode}: {summary.status}")
