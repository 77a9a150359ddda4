"""What every stage task shares: the per-run cache and the retry rule."""

from __future__ import annotations

from prefect.cache_policies import RUN_ID, TASK_SOURCE

from guardsync.errors import TransientError

# Cached per flow run: a failed run retried in Prefect (same run id) reuses the stages that
# completed (the extract, the plan) and re-runs only what failed. The next run recomputes.
PER_RUN = TASK_SOURCE + RUN_ID


def transient_only(task, task_run, state) -> bool:
    """Retry a task only when it failed on something retrying can heal (throttling, 5xx, network)."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False
