"""One guardsync run, as a scheduled `guardsync sync` would make it, measured from inside.

    python -m bench.sync_once --config guardsync.toml --out result.json

A process of its own per run, so its CPU time and peak memory (getrusage) are this
run's alone, and Prefect starts up as it does for a real run (a temporary local
server when PREFECT_API_URL is not set). It runs the real `sync-directory` flow and
writes, as JSON:

- wall time from process start, and when the flow body began (Prefect start-up);
- per stage (each Prefect task of the flow): wall and process CPU time of the task
  body, measured by wrapping the task's function, and RSS after it;
- the flow run's id (the harness reads the task runs' own timing from the Prefect
  API after this process ends, so the read is not part of the run's wall time);
- the requests the Graph and SCIM clients made, by endpoint (their requests_made);
- CPU time (user, system) and peak RSS of this process; the run's summary.

CPU per stage is the whole process's (time.process_time): it includes the loader's
threads, and Prefect's background threads while the stage runs.
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

TASK_MODULES = ("tasks.extract", "tasks.flatten", "tasks.scope", "tasks.validate", "tasks.plan", "tasks.load")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class Probe:
    """Wall and CPU time of each wrapped function, and the clients the flow made."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.clients: dict[str, object] = {}
        self.flow_started: float | None = None

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                stage = self.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
                stage["wall_s"] += time.perf_counter() - wall
                stage["cpu_s"] += time.process_time() - cpu
                stage["calls"] += 1
                stage["rss_mb_after"] = round(rss_mb(), 1)

        return wrapper

    def install(self) -> list[str]:
        """Wrap the body of every Prefect task of the flow, and the flow's `connect`."""
        from prefect import Task

        import flows.sync_directory as flow_module

        wrapped = []
        for module_name in TASK_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for value in vars(module).values():
                if isinstance(value, Task) and not getattr(value.fn, "_bench_wrapped", False):
                    value.fn = self.timed(value.name, value.fn)
                    value.fn._bench_wrapped = True
                    wrapped.append(value.name)
        if hasattr(flow_module, "connect"):
            connect = flow_module.connect

            @functools.wraps(connect)
            def capturing_connect(*args, **kwargs):
                # The first thing the flow body does: when it runs, Prefect has started.
                # (The flow's own function is not wrapped: Prefect builds its parameter model from it.)
                self.flow_started = self.flow_started or time.monotonic()
                made = connect(*args, **kwargs)
                for client in made:
                    kind = type(client).__name__
                    if kind in ("GraphClient", "ScimClient"):
                        self.clients[kind] = client
                return made

            flow_module.connect = capturing_connect
        return wrapped

    def requests_made(self) -> dict[str, dict[str, int]]:
        return {kind: dict(getattr(client, "requests_made", Counter())) for kind, client in self.clients.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_once")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--full", action="store_true", help="ignore Graph delta links (flows that have them)")
    args = parser.parse_args(argv)

    probe = Probe()
    result: dict = {"ok": False}
    try:
        from guardsync.config import load_settings

        settings = load_settings(args.config)
        import flows.sync_directory as flow_module
        from guardsync.cli import skip_final_collection

        skip_final_collection()  # as `guardsync sync` does

        result["wrapped_tasks"] = probe.install()
        result["imports_done_s"] = round(time.monotonic() - PROCESS_START, 3)
        options = {"full": True} if args.full else {}
        flow_wall = time.monotonic()
        state = flow_module.sync_directory(settings=settings, return_state=True, **options)
        result["flow_call_s"] = round(time.monotonic() - flow_wall, 3)
        if probe.flow_started is not None:
            result["prefect_startup_s"] = round(probe.flow_started - PROCESS_START, 3)
            result["flow_body_s"] = round(time.monotonic() - probe.flow_started, 3)
        result["state"] = state.name
        try:
            summary = state.result(raise_on_failure=False)
            if isinstance(summary, dict):
                result["summary"] = {k: summary.get(k) for k in ("status", "counts", "excluded", "quarantined", "failures", "requests", "message")}
            else:
                result["summary"] = {"error": repr(summary)[:2000]}
        except Exception as exc:  # noqa: BLE001 - report, not crash
            result["summary"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["run_done_s"] = round(time.monotonic() - PROCESS_START, 3)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # before the API read-back below adds to it
        result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
        result["max_rss_mb"] = usage.ru_maxrss / 1024
        result["stages"] = probe.stages
        result["requests_made"] = probe.requests_made()
        result["flow_run_id"] = str(state.state_details.flow_run_id)
        result["ok"] = state.is_completed()
    except BaseException as exc:  # noqa: BLE001 - the harness reads the JSON whatever happened
        result["error"] = "".join(traceback.format_exception(exc))[-4000:]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
