"""Stage 6: apply the plan to Atlassian, users then groups then memberships.

Each write is recorded in the state store as it succeeds, so a retry of a failed
load (same flow run, the earlier stages cached) skips what is done and finishes the rest.

Every directory on one SCIM API shares that API's rate limit, so a load holds slots of
a Prefect global concurrency limit named after the API host (`scim-api.atlassian.com`),
one slot per write thread: parallel runs on several workers together stay under it.
The limit is optional: when nobody created it, the load runs unthrottled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from guardsync.load import Loader, LoadReport
from guardsync.progress import chain, progress_reporter
from guardsync.changes import Plan
from tasks.common import PERSISTED, transient_only

_UNTHROTTLED_SAID: set[tuple[str, str]] = set()  # (flow run id, limit name): "no limit" said for this run
TERMINAL_PROGRESS = progress_reporter()  # to sys.stderr as it is when a stage reports: bars on a terminal, a plain line every 10% elsewhere

LOAD_OPTIONS = dict(**PERSISTED, retries=2, retry_delay_seconds=30,
                    retry_condition_fn=transient_only)


def scim_limit_name(scim_url: str) -> str:
    """The global concurrency limit of a SCIM API: 'scim-api.atlassian.com' for every Atlassian directory."""
    return "scim-" + (urlsplit(scim_url).hostname or "unknown").lower()


def _configured_limit(name: str) -> int | None:
    """The size of the active global concurrency limit `name`, or None when there is none to honour."""
    logger = get_run_logger()
    try:
        with get_client(sync_client=True) as client:
            found = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        # Optional (it matters when several directories share one SCIM API): said once a run, at debug
        # level, so runs that need no limit (one directory, the demo) stay quiet. The README says how to see it.
        said = (str(runtime.flow_run.id), name)
        if said not in _UNTHROTTLED_SAID:
            _UNTHROTTLED_SAID.add(said)
            logger.debug("no global concurrency limit %r: SCIM writes are not throttled across runs "
                         "(create it with `prefect gcl create %s --limit N`)", name, name)
        return None
    except Exception as exc:  # the Prefect API hiccuped: the SCIM client's own 429 handling still protects the API
        logger.warning("could not read global concurrency limit %r (%s); loading without it", name, type(exc).__name__)
        return None
    return found.limit if found.active else None


@contextmanager
def scim_write_slots(loader: Loader, changes: int) -> Iterator[None]:
    """Hold one slot of the SCIM API's global concurrency limit per write thread while a stage loads.

    No changes, no limit (or an inactive one): nothing is held and nothing waits. A limit smaller
    than write_concurrency lowers this stage's threads to the limit, so occupy never exceeds it.
    """
    name = scim_limit_name(loader.scim.scim_url)
    limit = _configured_limit(name) if changes else None
    if limit is None:
        yield
        return
    threads = loader.concurrency
    occupy = max(1, min(threads, limit))
    loader.concurrency = occupy
    try:
        # strict=False: should the limit vanish meanwhile, Prefect logs it and lets the load go on.
        with concurrency(name, occupy=occupy, strict=False):
            get_run_logger().info("holding %d of the %d slots of %s", occupy, limit, name)
            yield
    finally:
        loader.concurrency = threads


def _start(loader: Loader, stage: str) -> None:
    """A fresh report for this stage, and a progress artifact that moves as writes land."""
    loader.report = LoadReport()
    artifact_id = create_progress_artifact(0.0, key=f"load-{stage}", description=f"Progress of the {stage} load")
    loader.on_progress = chain(
        lambda _stage, done, total: update_progress_artifact(artifact_id, 100.0 * done / max(total, 1)),
        TERMINAL_PROGRESS,
    )


def _result(loader: Loader) -> dict:
    return {"counts": dict(loader.report.counts), "failures": list(loader.report.failures)}


@task(name="load-users", **LOAD_OPTIONS)
def load_users(loader: Loader, plan: Plan) -> dict:
    _start(loader, "users")
    with scim_write_slots(loader, len(plan.users)):
        loader.load_users(plan)
    return _result(loader)


@task(name="load-groups", **LOAD_OPTIONS)
def load_groups(loader: Loader, plan: Plan) -> dict:
    _start(loader, "groups")
    with scim_write_slots(loader, len(plan.groups)):
        loader.load_groups(plan)
    return _result(loader)


@task(name="load-memberships", **LOAD_OPTIONS)
def load_memberships(loader: Loader, plan: Plan) -> dict:
    """Members to add and remove, and (observing runs) accounts guardsync does not manage, taken out of its groups."""
    _start(loader, "memberships")
    with scim_write_slots(loader, len(plan.members) + len(plan.foreign)):
        loader.load_members(plan)
    return _result(loader)
