"""What every stage task shares: the per-run cache and the retry rule."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE, RUN_ID, TASK_SOURCE

from guardsync.errors import TransientError
from tasks.results import SERIALIZER

# Cached per flow run: a failed run retried in Prefect (same run id) reuses the stages that
# completed (the extract, the drift read, the plan, the loads) and re-runs only what failed.
# The next run recomputes. Their results are typed JSON (tasks.results), never pickle.
PER_RUN = TASK_SOURCE + RUN_ID
PERSISTED = dict(cache_policy=PER_RUN, persist_result=True, result_serializer=SERIALIZER)
# Stages a retry recomputes in moments from the kept extract (flatten, scope, gates): nothing persisted,
# so no more of the tenant lies in the result storage than a retry needs.
RECOMPUTED = dict(cache_policy=NO_CACHE, persist_result=False)


def transient_only(task, task_run, state) -> bool:
    """Retry a task only when it failed on something retrying can heal (throttling, 5xx, network)."""
    try:
        state.result()
    except TransientError as exc:
        # A server that asked for a longer wait than the task's own pause is not asked again sooner.
        return exc.retry_after is None or exc.retry_after <= _shortest_delay(task.retry_delay_seconds)
    except Exception:
        return False
    return False


def _shortest_delay(delays) -> float:
    """A task's retry_delay_seconds as Prefect holds it: a number, a list of them, or None."""
    if isinstance(delays, (list, tuple)):
        return min(delays, default=0)
    return delays or 0
