"""Leaver latency on the fast cadence: `make bench-latency` (python -m bench.latency).

    python -m bench.latency                       # 10k users, 10 leavers, PostgreSQL for Prefect (~20 minutes)
    python -m bench.latency --users 2000 --leavers 3 --quiet-runs 3   # a quick look (~8 minutes)

As production runs it: a Prefect server (on a fresh PostgreSQL database of this machine's server,
or `--sqlite`), a process work pool with one standing worker, and the sync-directory deployment
made by `prefect deploy` from this repository's prefect.yaml (its first directory pointed at the
sandbox, its every-minute schedule on). The sandbox (bench.serve: Graph emulator and SCIM server,
20 ms a request) holds a generated tenant. After the initial sync:

1. quiet: `--quiet-runs` scheduled runs with no change in Entra. Per run: the CPU of the flow run's
   process (the worker's reaped children, so exact), the Prefect database's rows and bytes per table
   (before and after the window, divided by the runs), requests.
2. leavers: `--leavers` users disabled in Entra at random moments (gaps uniform in `--gap`); each one's
   latency runs from the change in Entra to the moment Atlassian's account is inactive (the harness
   asks the sandbox every half second).

It prints leaver latency p50/p95/max, worker CPU seconds per hour, requests per hour on each API and
Prefect database growth per day at one run a minute, beside the same figures for the 4-hour schedule,
computed from the measured runs (a leaver waits for the next run: uniform over the interval), and
writes everything to bench-results/latency-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from bench.run import ROOT, PrefectServer, SandboxProcess, Scenario, terminate
from flows.prune_quiet_runs import QUIET_TAG

TICK = os.sysconf("SC_CLK_TCK")
FAST, SLOW = 60, 4 * 3600  # the fast cadence and Atlassian's default, in seconds
DAY = 86400
# The server settings README's "The fast cadence" gives: a run that waited for its directory's slot
# (the one before it still running) looks again after 5 s, not 30.
FAST_CADENCE_SERVER = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5"}
RUN_TABLES = ("flow_run", "flow_run_state", "log", "task_run", "task_run_state", "artifact", "artifact_collection")
EVENT_TABLES = ("events", "event_resources")
QUIET_KEEP_DAYS = 1  # prune-quiet-runs' keep_hours (24) in prefect.yaml
EVENT_DAYS = 7  # Prefect's event retention (PREFECT_SERVER_EVENTS_RETENTION_PERIOD, default)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- the Prefect API, plainly (the harness keeps Prefect's settings out of its own process) -----


class Api:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            raw = answer.read()
        return json.loads(raw) if raw else None

    def flow_runs(self, deployment_id: str) -> list[dict]:
        runs, offset = [], 0
        while page := self.call("POST", "/flow_runs/filter", {
                "deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC",
                "limit": 200, "offset": offset}):
            runs += page
            offset += len(page)
        return runs

    def finished(self, deployment_id: str) -> list[dict]:
        return [r for r in self.flow_runs(deployment_id) if r["end_time"] and r["state_type"] in TERMINAL]


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_cli(env: dict, *args: str) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)}: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return done.stdout


# -- the worker and its CPU --------------------------------------------------------------------


class Worker:
    """`prefect worker start` on the pool; a sampler records its CPU and, at each reaped flow-run process,
    that process's CPU (cutime + cstime grow by exactly the child's CPU when the worker reaps it)."""

    def __init__(self, env: dict, log_path: Path):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                         "guardsync", "--type", "process", "--name", "bench-worker"],
                                        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.reaped: list[tuple[float, float, float]] = []  # (when, CPU seconds, wall seconds) of each flow-run process
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def cpu(self) -> tuple[float, float]:
        """(the worker's own CPU seconds, its reaped children's)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(v) / TICK for v in fields[11:15])
        return utime + stime, cutime + cstime

    def children(self) -> set[int]:
        """The worker's child processes (by their parent pid in /proc/PID/stat)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile
                if parent == self.process.pid:
                    found.add(int(entry.name))
        return found

    def _sample(self) -> None:
        last, born = self.cpu()[1], {}  # born: child pid -> when first seen (a run's process lives seconds)
        while not self._stop.wait(0.25):
            try:
                children, alive = self.cpu()[1], self.children()
            except OSError:
                return
            now = time.time()
            for pid in alive - set(born):
                born[pid] = now
            if children > last:
                gone = [born.pop(pid) for pid in set(born) - alive]
                self.reaped.append((now, children - last, now - min(gone) if gone else float("nan")))
                last = children

    def stop(self) -> None:
        self._stop.set()
        terminate(self.process)
        self.log.close()


# -- the Prefect database ----------------------------------------------------------------------


class PrefectDatabase:
    """Rows and bytes per table (pg_total_relation_size: indexes and TOAST included; SQLite: dbstat pages)."""

    def __init__(self, sqlite_path: Path | None, work: Path):
        self.sqlite_path = sqlite_path
        self.name = None
        if sqlite_path is None:
            import psycopg

            self.name = f"guardsync_bench_{datetime.now():%Y%m%d%H%M%S}_{os.getpid()}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {self.name}")
        self.url = (f"sqlite+aiosqlite:///{sqlite_path}" if sqlite_path is not None
                    else f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.name}")

    def tables(self) -> dict[str, list[int]]:
        if self.sqlite_path is not None:
            import sqlite3

            with sqlite3.connect(self.sqlite_path) as conn:
                names = [n for (n,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
                sizes = dict(conn.execute("SELECT coalesce(tbl_name, name), sum(pgsize) FROM dbstat "
                                          "JOIN sqlite_schema USING (name) GROUP BY 1"))
                return {n: [conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0], sizes.get(n, 0)] for n in names}
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{self.name}") as conn:
            names = [n for (n,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            return {n: list(conn.execute(f'SELECT count(*), pg_total_relation_size(\'"{n}"\') FROM "{n}"').fetchone())
                    for n in names}

    def drop(self) -> None:
        if self.name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def growth(before: dict, after: dict) -> dict[str, list[int]]:
    out = {}
    for table in sorted(set(before) | set(after)):
        rows = after.get(table, [0, 0])[0] - before.get(table, [0, 0])[0]
        size = after.get(table, [0, 0])[1] - before.get(table, [0, 0])[1]
        if rows or size:
            out[table] = [rows, size]
    return out


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Window:
    """What a stretch of the cadence cost: from one run's end to another's."""

    started: float
    ended: float = 0.0
    runs: list[dict] = field(default_factory=list)
    cpu_worker_s: float = 0.0  # the worker's own (polling, starting processes)
    cpu_runs_s: dict[str, float] = field(default_factory=dict)  # each flow-run process's CPU, by flow run id
    wall_runs_s: dict[str, float] = field(default_factory=dict)  # and its life, start to exit
    requests: dict[str, int] = field(default_factory=dict)
    database: dict[str, list[int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def render_deployment(state: str, sandbox_config: dict, name: str = "bench", profile_to: Path | None = None) -> dict:
    """prefect.yaml's first directory, pointed at the sandbox, its every-minute schedule (paused until the
    initial sync is done); the retention deployment left out (its first run would fall in the window)."""
    data = json.loads(json.dumps(yaml.safe_load((ROOT / "prefect.yaml").read_text())))
    deployment = next(d for d in data["deployments"] if d["entrypoint"].startswith("flows/sync_directory.py"))
    settings = deployment["parameters"]["settings"]
    settings["entra"] = sandbox_config["entra"]
    settings["atlassian"] = sandbox_config["atlassian"]
    settings["sync"] = {**settings["sync"], "state": state, "max_group_size": 1_000_000}
    fast = [s for s in deployment["schedules"] if s["interval"] == FAST]
    assert fast and fast[0]["active"], "prefect.yaml's fast cadence (every minute, active) is what this measures"
    deployment["schedules"] = [{"interval": FAST, "active": False}]
    deployment["name"] = name
    if profile_to is not None:  # each flow-run process under cProfile, one file a process
        deployment["work_pool"]["job_variables"]["command"] = (
            f"/bin/sh -c 'exec {sys.executable} -m cProfile -o {profile_to}/run-$$.prof -m prefect.engine'")
    data["deployments"] = [deployment]
    return data


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p95 of 10 samples is the 10th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * share) - 1)] if ordered else float("nan")


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()  # the API's times carry their zone


def process_by_run(runs: list[dict], reaped: list[tuple]) -> dict[str, tuple]:
    """Each run's process, (when reaped, CPU s, wall s): the first reap after the run's end (runs of one
    deployment never overlap)."""
    out, free = {}, sorted(reaped)
    for flow_run in sorted(runs, key=lambda r: r["end_time"]):
        ended = epoch(flow_run["end_time"])
        match = next((item for item in free if item[0] >= ended - 1), None)
        if match is not None:
            out[flow_run["id"]] = match
            free.remove(match)
    return out


def run(args) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(args.out_dir) / "work" / f"latency-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(f"{args.users // 1000}k", args.users, args.users // 10, args.users * 5)
    began = time.monotonic()
    log = lambda message: print(f"[{time.monotonic() - began:6.0f} s] {message}", flush=True)  # noqa: E731
    sandbox = SandboxProcess(scenario, args.latency, work / "sandbox.log")
    log(f"sandbox up: {sandbox.hello['tenant']}")
    database = PrefectDatabase(work / "prefect.db" if args.sqlite else None, work)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(sandbox.hello["env"], DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GX_ANALYTICS_ENABLED="false", PREFECT_HOME=str(work / "prefect-home"))
    server = worker = None
    try:
        server = PrefectServer(work / "prefect-server", work / "prefect-server.log",
                               {**env, "PREFECT_API_DATABASE_CONNECTION_URL": database.url, **FAST_CADENCE_SERVER})
        env["PREFECT_API_URL"] = server.api_url
        api = Api(server.api_url)
        log(f"Prefect server up in {server.started_in:.1f} s ({'SQLite' if args.sqlite else 'PostgreSQL'})")

        (work / "prefect.yaml").write_text(yaml.safe_dump(render_deployment(
            f"sqlite:///{work / 'state.db'}", sandbox.hello["config"], profile_to=work if args.profile else None),
            sort_keys=False))
        prefect_cli(env, "work-pool", "create", "guardsync", "--type", "process")
        prefect_cli(env, "deploy", "--all", "--prefect-file", str(work / "prefect.yaml"))
        deployment = api.call("GET", "/deployments/name/sync-directory/bench")
        worker = Worker({**env, "GUARDSYNC_HOME": str(ROOT)}, work / "worker.log")

        # -- the initial sync, then the every-minute schedule ---------------------------------------
        initial = api.call("POST", f"/deployments/{deployment['id']}/create_flow_run", {"name": "initial-sync"})
        done = wait_for(lambda: next((r for r in api.finished(deployment["id"]) if r["id"] == initial["id"]), None),
                        args.initial_timeout, "the initial sync", every=3)
        if done["state_type"] != "COMPLETED":
            raise RuntimeError(f"the initial sync ended {done['state_name']}; see {work / 'worker.log'}")
        log(f"initial sync: {seconds_between(done['start_time'], done['end_time']):.0f} s")
        sandbox.ask("commit")
        for schedule in deployment["schedules"]:
            api.call("PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", {"active": True})

        def runs_ended() -> int:
            return len(api.finished(deployment["id"]))

        def after_runs(count: int, timeout: float) -> float:
            """Wait until `count` runs have ended and the last one's process is reaped; the moment."""
            wait_for(lambda: runs_ended() >= count, timeout, f"{count} runs to end", every=1)
            ended = epoch(api.finished(deployment["id"])[-1]["end_time"])
            wait_for(lambda: worker.reaped and worker.reaped[-1][0] >= ended - 1, 60, "the run's process to exit", 0.25)
            return time.time()

        def open_window() -> Window:
            window = Window(time.time())
            window.cpu_worker_s = worker.cpu()[0]
            window.requests = sandbox.ask("counts")
            window.database = database.tables()
            return window

        def close_window(window: Window) -> None:
            window.ended = time.time()
            window.cpu_worker_s = worker.cpu()[0] - window.cpu_worker_s
            counts = sandbox.ask("counts")
            window.requests = {api_name: sum(counts[api_name].values()) - sum(window.requests[api_name].values())
                               for api_name in ("graph", "scim")}
            window.database = growth(window.database, database.tables())
            window.runs = [r for r in api.finished(deployment["id"])
                           if window.started < epoch(r["end_time"]) <= window.ended]
            processes = process_by_run(window.runs, worker.reaped)
            window.cpu_runs_s = {run_id: cpu for run_id, (_, cpu, _) in processes.items()}
            window.wall_runs_s = {run_id: wall for run_id, (_, _, wall) in processes.items()}

        def idle() -> bool:
            return not any(r["state_type"] in ("RUNNING", "PENDING") for r in api.flow_runs(deployment["id"]))

        # -- 1. quiet runs ------------------------------------------------------------------------
        base = runs_ended()
        after_runs(base + 1, 300)  # the first scheduled run: the schedule is on
        quiet = open_window()
        after_runs(base + 1 + args.quiet_runs, 120 * args.quiet_runs)
        close_window(quiet)
        log(f"quiet: {len(quiet.runs)} runs, CPU per run {[round(c, 2) for c in quiet.cpu_runs_s.values()]} s, "
            f"database +{sum(b for _, b in quiet.database.values()) / 1024:.0f} KB")

        # -- 2. leavers at random moments ----------------------------------------------------------
        rng = random.Random(args.seed)
        leavers = open_window()
        seen_inactive: dict[str, float] = {}

        def poll_leavers() -> bool:
            disabled = sandbox.ask("leavers")
            for uid, (_, active) in disabled.items():
                if not active and uid not in seen_inactive:
                    seen_inactive[uid] = time.time()
            return len(seen_inactive) == len(disabled)

        for number in range(args.leavers):
            pause_until = time.monotonic() + rng.uniform(*args.gap)
            while time.monotonic() < pause_until:
                poll_leavers()
                time.sleep(0.5)
            sandbox.ask("disable", seed=rng.randrange(1 << 30))
            log(f"leaver {number + 1}/{args.leavers} disabled in Entra")
        wait_for(poll_leavers, args.drain_timeout, "the last leaver's account to be inactive", every=0.5)
        wait_for(idle, 600, "the run in progress to end", every=1)
        after_runs(runs_ended(), 60)
        close_window(leavers)
        disabled = sandbox.ask("leavers")
        latencies = sorted(seen_inactive[uid] - at for uid, (at, _) in disabled.items())
        log(f"leavers: latencies {[round(x) for x in latencies]} s")
        return report(args, scenario, quiet, leavers, latencies, done, work)
    finally:
        if worker is not None:
            worker.stop()
        if server is not None:
            server.stop()
        sandbox.stop()
        if not args.keep_database:
            database.drop()


def report(args, scenario, quiet: Window, leavers: Window, latencies, initial, work) -> dict:
    quiet_runs = len(quiet.runs)
    quiet_cpu = statistics.mean(quiet.cpu_runs_s.values()) if quiet.cpu_runs_s else float("nan")
    worker_idle_per_s = quiet.cpu_worker_s / quiet.seconds  # the worker's own polling, whatever runs
    busy = [r for r in leavers.runs if QUIET_TAG not in r["tags"]]
    busy_cpu = [leavers.cpu_runs_s[r["id"]] for r in busy if r["id"] in leavers.cpu_runs_s]
    busy_cpu_mean = statistics.mean(busy_cpu) if busy_cpu else float("nan")
    busy_wall = [seconds_between(r["start_time"], r["end_time"]) for r in busy]
    quiet_bytes = sum(size for _, size in quiet.database.values()) / max(quiet_runs, 1)
    quiet_rows = {table: rows / max(quiet_runs, 1) for table, (rows, _) in quiet.database.items()}
    busy_bytes = max(0.0, sum(size for _, size in leavers.database.values())
                     - quiet_bytes * (len(leavers.runs) - len(busy))) / max(len(busy), 1)
    per_run_requests = {name: quiet.requests[name] / max(quiet_runs, 1) for name in quiet.requests}
    busy_requests = {name: max(0.0, leavers.requests[name] - per_run_requests[name] * (len(leavers.runs) - len(busy)))
                     / max(len(busy), 1) for name in leavers.requests}
    run_seconds = statistics.median(busy_wall) if busy_wall else 0.0
    # The 4-hour schedule: a leaver waits for the next run (uniform over the interval), then one run.
    slow = {
        "latency_p50_s": 0.50 * SLOW + run_seconds, "latency_p95_s": 0.95 * SLOW + run_seconds,
        "latency_max_s": SLOW + run_seconds,
        "worker_cpu_s_per_hour": busy_cpu_mean * 3600 / SLOW + worker_idle_per_s * 3600,
        "requests_per_hour": {name: busy_requests[name] * 3600 / SLOW for name in busy_requests},
        "database_mb_per_day": busy_bytes * DAY / SLOW / 1e6,
    }
    fast = {
        "latency_p50_s": statistics.median(latencies), "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies), "leavers": len(latencies),
        "worker_cpu_s_per_hour": quiet_cpu * 3600 / FAST + worker_idle_per_s * 3600,
        "requests_per_hour": {name: per_run_requests[name] * 3600 / FAST for name in per_run_requests},
        "database_mb_per_day": quiet_bytes * DAY / FAST / 1e6,
        # What the database holds once the retentions run: a day of quiet runs (prune-quiet-runs), their
        # events for Prefect's event retention; with the overrides README gives, the lifecycle events
        # (all of a quiet run's but Completed) for a day.
        "database_mb_held": steady_state(quiet.database, quiet_runs, EVENT_DAYS),
        "database_mb_held_with_event_overrides": steady_state(quiet.database, quiet_runs, 1 + (EVENT_DAYS - 1) / 8),
    }
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M"), "workdir": str(work),
        "tenant": {"users": scenario.users, "groups": scenario.groups, "memberships": scenario.memberships},
        "latency_s": args.latency, "database": "SQLite" if args.sqlite else "PostgreSQL",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "initial_sync_s": seconds_between(initial["start_time"], initial["end_time"]),
        "quiet_run": {"runs": quiet_runs, "cpu_s": list(quiet.cpu_runs_s.values()), "cpu_mean_s": quiet_cpu,
                      "wall_s": [seconds_between(r["start_time"], r["end_time"]) for r in quiet.runs],
                      "process_wall_s": list(quiet.wall_runs_s.values()),
                      "requests": per_run_requests, "database_bytes": quiet_bytes, "database_rows": quiet_rows,
                      "database_by_table": {t: [rows / max(quiet_runs, 1), size / max(quiet_runs, 1)]
                                            for t, (rows, size) in quiet.database.items()}},
        "leaver_run": {"runs": len(busy), "cpu_s": busy_cpu, "cpu_mean_s": busy_cpu_mean, "wall_s": busy_wall,
                       "requests": busy_requests, "database_bytes": busy_bytes,
                       "runs_in_window": len(leavers.runs), "window_s": leavers.seconds},
        "worker_own_cpu_s_per_hour": worker_idle_per_s * 3600,
        "latencies_s": latencies, "every_minute": fast, "every_4_hours": slow,
        "goals": {
            "p95 <= 120 s at 10k users": fast["latency_p95_s"] <= 120 if scenario.users >= 10_000 else None,
            "no-change run <= 2 s of worker CPU": quiet_cpu <= 2,
            "database growth <= 50 MB a day at one run a minute": fast["database_mb_per_day"] <= 50,
        },
    }
    print_report(result)
    return result


def steady_state(by_table: dict[str, list[int]], runs: int, event_days: float) -> float:
    """MB the quiet runs of the fast cadence keep in the database once every retention runs."""
    per_run = {group: sum(by_table.get(t, [0, 0])[1] for t in tables) / max(runs, 1)
               for group, tables in (("runs", RUN_TABLES), ("events", EVENT_TABLES))}
    return (per_run["runs"] * QUIET_KEEP_DAYS + per_run["events"] * event_days) * DAY / FAST / 1e6


def print_report(r: dict) -> None:
    fast, slow, q, b = r["every_minute"], r["every_4_hours"], r["quiet_run"], r["leaver_run"]
    print(f"\n== leaver latency, {r['tenant']['users']:,} users, Prefect on {r['database']}, "
          f"{os.cpu_count()} cores (load {r['machine']['load_avg_at_end'][0]:.1f} at the end)")
    print(f"{'':34} {'every minute (measured)':>24} {'every 4 hours (computed)':>26}")
    rows = [
        ("leaver latency p50", f"{fast['latency_p50_s']:.0f} s", f"{slow['latency_p50_s'] / 3600:.2f} h"),
        ("leaver latency p95", f"{fast['latency_p95_s']:.0f} s", f"{slow['latency_p95_s'] / 3600:.2f} h"),
        ("leaver latency max", f"{fast['latency_max_s']:.0f} s", f"{slow['latency_max_s'] / 3600:.2f} h"),
        ("worker CPU per hour", f"{fast['worker_cpu_s_per_hour']:.0f} s", f"{slow['worker_cpu_s_per_hour']:.0f} s"),
        *[(f"{name} requests per hour", f"{fast['requests_per_hour'][name]:.0f}",
           f"{slow['requests_per_hour'][name]:.1f}") for name in ("graph", "scim")],
        ("Organizations API requests per hour", "0 (no [access])", "0 (no [access])"),
        ("Prefect database growth per day", f"{fast['database_mb_per_day']:.1f} MB", f"{slow['database_mb_per_day']:.2f} MB"),
        ("  held once retentions run", f"{fast['database_mb_held']:.0f} MB", "-"),
        ("  held, event overrides (README)", f"{fast['database_mb_held_with_event_overrides']:.0f} MB", "-"),
    ]
    for label, measured, computed in rows:
        print(f"{label:34} {measured:>24} {computed:>26}")
    print(f"\nno-change run: CPU {q['cpu_mean_s']:.2f} s (runs: {', '.join(f'{c:.2f}' for c in q['cpu_s'])}), its process "
          f"{statistics.median(q['process_wall_s'] or [float('nan')]):.1f} s start to exit, the flow run "
          f"{statistics.median(q['wall_s']):.1f} s in Prefect, requests {q['requests']}, database +{q['database_bytes'] / 1024:.1f} KB:")
    for table, (rows, size) in sorted(q["database_by_table"].items(), key=lambda item: -item[1][1]):
        print(f"    {table:<28} {rows:>+7.1f} rows {size / 1024:>+9.1f} KB")
    print(f"leaver run: CPU {b['cpu_mean_s']:.2f} s, wall {statistics.median(b['wall_s']) if b['wall_s'] else 0:.1f} s, "
          f"requests {({k: round(v, 1) for k, v in b['requests'].items()})}, database +{b['database_bytes'] / 1024:.0f} KB "
          f"({b['runs']} runs with changes of {b['runs_in_window']} in {b['window_s'] / 60:.1f} min)")
    print(f"latencies: {', '.join(f'{x:.0f}' for x in r['latencies_s'])} s")
    for goal, met in r["goals"].items():
        print(f"goal {goal}: {({True: 'MET', False: 'NOT MET', None: 'n/a'})[met]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--leavers", type=int, default=10)
    parser.add_argument("--quiet-runs", type=int, default=6)
    parser.add_argument("--gap", type=float, nargs=2, default=(20.0, 100.0), metavar=("MIN", "MAX"),
                        help="seconds between two leavers, uniform in [MIN, MAX]")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every Graph and SCIM request")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--sqlite", action="store_true", help="Prefect on SQLite instead of a PostgreSQL database")
    parser.add_argument("--profile", action="store_true",
                        help="run each flow-run process under cProfile (work/run-PID.prof; slows them down)")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the Prefect database at the end")
    parser.add_argument("--initial-timeout", type=float, default=900)
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--out-dir", default=str(ROOT / "bench-results"))
    args = parser.parse_args(argv)
    result = run(args)
    path = Path(args.out_dir) / f"latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"written: {path}")
    return 0 if all(met is not False for met in result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
