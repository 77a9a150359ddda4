"""The sync-directory flow: Entra ID -> gates -> Atlassian SCIM, one thin composition of stage tasks.

extract -> flatten -> scope -> validate (users, groups, memberships gates) -> plan (+ guards)
  -> load users -> load groups -> load memberships -> summary
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import opaque

from guardsync.config import Settings, resolve_secret
from guardsync.errors import GuardsyncBlocked, GuardsyncError
from guardsync.gates import warm_up_in_background
from guardsync.models import content_digest, user_columns
from guardsync.graph import DeltaLinks, GraphClient
from guardsync.load import Loader
from guardsync.scim import ScimClient
from guardsync.state import StateStore
from guardsync.summary import RunSummary
from tasks.extract import Extracted, extract
from tasks.flatten import flatten
from tasks.load import TERMINAL_PROGRESS, load_groups, load_memberships, load_users
from tasks.observe import observe_atlassian
from tasks.plan import plan_changes
from tasks.scope import scope_users
from tasks.validate import validate_gates

os.environ.setdefault("DO_NOT_TRACK", "1")  # the flow never phones home, wherever it runs


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
    entra, atlassian = settings.entra, settings.atlassian
    graph = GraphClient(
        tenant_id=entra.tenant_id,
        client_id=entra.client_id,
        client_secret=resolve(entra.client_secret, "entra.client_secret"),
        certificate_path=entra.certificate_path,
        authority_host=entra.authority_host,
        graph_url=entra.graph_url,
    )
    graph.on_progress = TERMINAL_PROGRESS
    scim = ScimClient(atlassian.scim_url, resolve(atlassian.api_key, "atlassian.api_key"), dry_run=dry_run)
    state_url = settings.sync.state
    if state_url.startswith(("env:", "prefect:")):
        state_url = resolve(state_url, "sync.state")
    return graph, scim, StateStore(state_url, read_only=dry_run)  # a dry run writes nothing anywhere


@flow(name="sync-directory", persist_result=True, log_prints=True)
def sync_directory(
    settings: Settings,
    dry_run: bool = False,
    full: bool = False,
    allow_mass_deactivation: bool = False,
) -> dict:
    """One run: read Entra ID, gate, plan, and (unless dry_run) apply to Atlassian."""
    run_id = str(runtime.flow_run.id)
    mode = "dry-run" if dry_run else "sync"
    graph, scim, store = connect(settings, dry_run)
    summary = RunSummary(run_id=run_id, mode=mode, status="running", identifier=settings.sync.identifier)
    if not dry_run:
        store.acquire_lock(run_id)  # one run per directory at a time; DirectoryBusy otherwise
        store.start_run(run_id, mode)
    try:
        previous, links, last_full = store.load_mirror()
        needed = user_columns(settings.attributes.sources())
        full_read = (full or previous is None or full_read_due(last_full, settings.sync.full_read_every_hours)
                     or not set(needed) <= set(previous.users.columns))  # newly mapped: the mirror lacks it
        if full_read:  # a full read waits seconds on Graph, and the gates follow: make GX ready meanwhile
            warm_up_in_background()
        extracted = extract(graph, None if full_read else previous, None if full_read else DeltaLinks(**links), needed)
        snapshot = extracted.snapshot
        store.check_binding(snapshot.tenant_id, settings.atlassian.scim_url)
        if not dry_run and extracted.changed:
            store.save_mirror(snapshot, asdict(extracted.links), extracted.full)
        elif not dry_run and asdict(extracted.links) != links:
            store.save_links(asdict(extracted.links))
        summary.last_full_read = (datetime.now(timezone.utc) if extracted.full else last_full).isoformat(timespec="seconds")
        settled = content_digest({"settings": settings.model_dump(mode="json"), "allow": allow_mass_deactivation})
        if not dry_run and not extracted.changed and store.is_settled(settled):
            summary.message = "no change in Entra since the last completed run with these settings: nothing to do"
        else:
            if not dry_run:
                store.settle(None)  # until this run completes
            reconcile(summary, extracted, settings, graph, scim, store, dry_run, allow_mass_deactivation)
        summary.requests = {"graph": sum(graph.requests_made.values()), "scim": sum(scim.requests_made.values())}
        summary.status = "completed" if not summary.failures else "failed"
        if summary.status == "completed" and not dry_run:
            store.settle(settled)  # the next run with no change in Entra can stop after the read
    except GuardsyncBlocked as exc:
        summary.status, summary.message = "blocked", str(exc)
        raise
    except Exception as exc:
        summary.status, summary.message = "failed", str(exc) if isinstance(exc, GuardsyncError) else type(exc).__name__
        raise
    finally:
        publish_summary(summary)
        if not dry_run:
            store.finish_run(run_id, summary.status, summary.counts, summary.message or None)
            store.release_lock(run_id)
        store.dispose()
    if summary.failures:
        raise WritesFailed(summary)
    return summary.as_dict()


def reconcile(summary: RunSummary, extracted: Extracted, settings: Settings, graph: GraphClient, scim: ScimClient,
              store: StateStore, dry_run: bool, allow_mass_deactivation: bool) -> None:
    """Scope, gate, plan and (unless dry_run) load one snapshot; fills the summary as it goes."""
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
    observation = None
    # Plan against Atlassian as it is: on first runs, full reads, and after an observing run that
    # did not finish (what it adopted was not all recorded). Delta runs plan from the record.
    if extracted.full or first_run or store.observation_pending():
        observation = observe_atlassian(scim, opaque(recorded))
        summary.drift = observation.drift.lines()
    # opaque(): Prefect would otherwise walk every object of these large inputs looking for futures.
    plan = plan_changes(opaque(validated), opaque(recorded), opaque(observation), settings.sync, allow_mass_deactivation)
    summary.excluded["disabled_never_synced"] = plan.not_created_disabled
    summary.handovers = [handover.line() for handover in plan.handovers]
    if dry_run:
        summary.counts = plan.counts()
    else:
        store.bind(snapshot.tenant_id, settings.atlassian.scim_url)
        if observation is not None:
            store.set_observation_pending(True)
        loader = Loader(scim, store, run_id, settings.sync.write_concurrency)
        for result in (load_users(loader, opaque(plan)), load_groups(loader, opaque(plan)),
                       load_memberships(loader, opaque(plan))):
            for key, value in result["counts"].items():
                summary.counts[key] = summary.counts.get(key, 0) + value
            summary.failures += result["failures"]
        if observation is not None and not summary.failures:
            store.set_observation_pending(False)
    summary.new_groups = sorted(validated.groups[c.group_id].display_name for c in plan.groups if c.kind == "create")
    summary.renamed_groups = sorted(c.display_name for c in plan.groups if c.kind == "rename")


def publish_summary(summary: RunSummary) -> None:
    lines = summary.lines()
    get_run_logger().info("\n".join(lines))
    create_markdown_artifact(key="summary", markdown="# Summary\n\n" + "\n".join(f"- {line.strip()}" for line in lines),
                             description=f"guardsync {summary.mode}: {summary.status}")
