"""The benchmark: synthetic tenants synced through the sandbox with latency on every request.

    python -m bench                      # the 10k and 100k scenarios (make bench)
    python -m bench --scenario quick     # 2k users, about a minute (make bench-quick)
    python -m bench --scenario 10k --profile   # also a py-spy profile of each run

Each scenario starts the sandbox in a process of its own (bench.serve) and a Prefect
server (as a deployment's scheduled runs have; `--ephemeral-prefect` instead lets each
run start a temporary one, as `guardsync sync` does without PREFECT_API_URL), then runs
guardsync three times, each in a fresh process (bench.sync_once), as a schedule would:
the initial sync, a re-run with no change, and a re-run after 1% of the users
changed. For each run it records wall time (end to end, Prefect start-up included),
per-stage times, the requests made by endpoint (clients' and servers' counts), the
fewest requests the job needs (bench.model) and the ratio, CPU time and peak memory
of the guardsync process, and checks the targets. It prints a table and writes
everything to bench-results/<scenario>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from guardsync.sandbox.stack import to_toml

ROOT = Path(__file__).resolve().parent.parent
WRITES = ("POST", "PUT", "PATCH", "DELETE")
MB_PER_GIB = 1024.0


def terminate(process: subprocess.Popen) -> None:
    """Stop a child: SIGTERM, and SIGKILL if it is still there after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Scenario:
    name: str
    users: int
    groups: int
    memberships: int
    depth: int = 4
    brownfield: bool = False  # Atlassian already holds every user (no externalId, 10% stale titles) and group


SCENARIOS = {
    "tiny": Scenario("tiny", 300, 30, 1200),
    "tiny-brownfield": Scenario("tiny-brownfield", 300, 30, 1200, brownfield=True),
    "quick": Scenario("quick", 2_000, 200, 10_000),
    "10k": Scenario("10k", 10_000, 1_000, 50_000),
    "10k-brownfield": Scenario("10k-brownfield", 10_000, 1_000, 50_000, brownfield=True),
    "quick-brownfield": Scenario("quick-brownfield", 2_000, 200, 10_000, brownfield=True),
    "100k": Scenario("100k", 100_000, 5_000, 500_000),
}
RUNS = ("initial", "no-change", "churn-1%")


# -- the sandbox process ------------------------------------------------------------------


class SandboxProcess:
    """bench.serve in a child process, driven by JSON lines."""

    def __init__(self, scenario: Scenario, latency: float, log_path: Path, seed: int = 7):
        self.log = open(log_path, "w")
        command = [sys.executable, "-m", "bench.serve", "--users", str(scenario.users), "--groups", str(scenario.groups),
                   "--memberships", str(scenario.memberships), "--depth", str(scenario.depth), "--seed", str(seed),
                   "--latency", str(latency)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the sandbox did not start; see {log_path}")
        self.hello = json.loads(line)

    def ask(self, cmd: str, **args) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"sandbox {cmd}: {answer['error']}")
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


# -- Prefect ------------------------------------------------------------------------------


class PrefectServer:
    """`prefect server start` on loopback, as a deployment's scheduled runs have one (SQLite in the workdir)."""

    def __init__(self, home: Path, log_path: Path, env: dict):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/api"
        prefect = str(Path(sys.executable).parent / "prefect")
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=home.parent,
            env={**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": self.api_url},
            stdout=self.log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() - started > 120:
                self.stop()
                raise RuntimeError(f"the Prefect server did not start; see {log_path}")
            time.sleep(0.3)
        self.started_in = time.monotonic() - started

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def task_timings(self, flow_run_id: str) -> dict[str, dict]:
        """Each task run of a flow run as the API recorded it, orchestration included (state changes
        arrive as events, so this waits a little for the last of them)."""
        query = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode()
        deadline = time.monotonic() + 10
        while True:
            request = urllib.request.Request(f"{self.api_url}/task_runs/filter", data=query,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    runs = json.load(answer)
            except OSError as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
            if runs and all(run.get("end_time") for run in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        timings: dict[str, dict] = {}
        for run in runs:
            entry = timings.setdefault(run["name"].rsplit("-", 1)[0], {"wall_s": 0.0, "runs": 0, "state": None})
            if run.get("start_time") and run.get("end_time"):
                entry["wall_s"] += _seconds_between(run["start_time"], run["end_time"])
            entry["runs"] += 1
            entry["state"] = run.get("state_name")
        return timings

    def stop(self) -> None:
        terminate(self.process)
        self.log.close()


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# -- one guardsync run --------------------------------------------------------------------


def run_guardsync(config_file: Path, out: Path, env: dict, log_path: Path, profile: Path | None) -> tuple[dict, dict]:
    """bench.sync_once in a fresh process; (its JSON, rusage of it and its children, wall)."""
    command = [sys.executable, "-m", "bench.sync_once", "--config", str(config_file), "--out", str(out)]
    if profile is not None:
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if py_spy is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        command = [py_spy, "record", "--format", "raw", "--rate", "50", "--nonblocking", "-o", str(profile), "--"] + command
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"no result; see {log_path}"}
    return result, {"wall_s": wall, "exit": process.returncode,
                    "cpu_with_children_s": usage.ru_utime + usage.ru_stime}


# -- accounting ---------------------------------------------------------------------------


def split_counts(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(counts.items()) if v}


def writes_of(counts: dict[str, int]) -> int:
    return sum(n for key, n in counts.items() if key.split(" ", 1)[0] in WRITES)


def evaluate(run: str, scenario: Scenario, record: dict, latency: float, concurrency: int) -> dict[str, dict]:
    """Each target: measured, target, met (None when it does not apply to this run)."""
    made, minimum = record["requests"]["made_total"], record["requests"]["minimum_total"]
    if not record["ok"]:
        return {"run_completed": {"measured": False, "target": "the run completes", "met": False}}
    targets = {
        "requests_vs_minimum": {"measured": record["requests"]["ratio"], "target": "<= 1.05", "met": made <= 1.05 * minimum},
    }
    if run == "initial":
        bound = made * latency / concurrency
        targets["initial_wall_vs_api_bound"] = {
            "measured": round(record["wall_s"], 1), "target": f"<= {1.25 * bound:.1f} s (1.25 x {made} x {latency} / {concurrency})",
            "met": record["wall_s"] <= 1.25 * bound,
            "without_prefect_startup": record.get("flow_body_s"),
            "bound_with_minimum_requests_s": round(minimum * latency / concurrency, 1),
        }
    if run == "no-change":
        graph = record["requests"]["graph_made_total"]
        scim_writes = record["requests"]["scim_writes_made"]
        targets["no_change_graph_requests"] = {"measured": graph, "target": "<= 10", "met": graph <= 10}
        targets["no_change_scim_writes"] = {"measured": scim_writes, "target": "0", "met": scim_writes == 0}
        targets["no_change_wall"] = {"measured": round(record["wall_s"], 1), "target": "< 20 s (100k)",
                                     "met": record["wall_s"] < 20 if scenario.users >= 100_000 else None}
    if run.startswith("churn"):
        writes, changes = record["requests"]["scim_writes_made"], record["requests"]["scim_writes_minimum"]
        targets["churn_scim_writes_equal_changes"] = {"measured": writes, "target": f"== {changes}", "met": writes == changes}
    if scenario.users >= 100_000:
        rss = record.get("max_rss_mb") or 0
        targets["peak_memory"] = {"measured": f"{rss / MB_PER_GIB:.2f} GiB", "target": "<= 1.5 GiB", "met": rss <= 1.5 * MB_PER_GIB}
        cpu = record.get("transform_cpu_s")
        targets["transform_cpu"] = {"measured": cpu, "target": "<= 30 s (flatten+scope+validate+plan)",
                                    "met": None if cpu is None else cpu <= 30}
    return targets


def transform_cpu(stages: dict) -> float | None:
    names = [n for n in ("flatten", "scope", "validate", "plan") if n in stages]
    return round(sum(stages[n]["cpu_s"] for n in names), 2) if names else None


# -- a scenario ---------------------------------------------------------------------------


def run_scenario(scenario: Scenario, args, out_dir: Path) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = out_dir / "work" / f"{scenario.name}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n== scenario {scenario.name}: {scenario.users} users, {scenario.groups} groups, "
          f"{scenario.memberships} memberships, depth {scenario.depth}; latency {args.latency * 1000:g} ms", flush=True)
    started = time.monotonic()
    sandbox = SandboxProcess(scenario, args.latency, work / "sandbox.log")
    print(f"   sandbox up in {time.monotonic() - started:.1f} s: {sandbox.hello['tenant']}", flush=True)
    if scenario.brownfield:
        print(f"   Atlassian provisioned before the first run: {sandbox.ask('provision', stale=0.1, seed=3)}", flush=True)
    config = sandbox.hello["config"]
    # The generated 100k tenant has groups of 12k-22k users: over the default cap (10,000), which
    # rightly blocks the run. The benchmark is about speed, so the cap is lifted.
    config["sync"] = {"state": f"sqlite:///{work / 'state.db'}", "max_group_size": 1_000_000}
    if args.concurrency:
        config["sync"]["write_concurrency"] = args.concurrency
    concurrency = args.concurrency or 4  # guardsync's default write_concurrency and Graph member readers
    config_file = work / "guardsync.toml"
    config_file.write_text(to_toml(config))
    env = {**os.environ, **sandbox.hello["env"], "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PREFECT_API_URL", None)
    prefect_server = None
    if not args.ephemeral_prefect:  # the runs talk to a standing server, as a deployment's scheduled runs do
        prefect_server = PrefectServer(work / "prefect-server", work / "prefect-server.log", env)
        env["PREFECT_API_URL"] = prefect_server.api_url
        print(f"   Prefect server up in {prefect_server.started_in:.1f} s at {prefect_server.api_url}", flush=True)

    records = []
    try:
        for run in RUNS:
            churned = sandbox.ask("churn", fraction=0.01, seed=1) if run.startswith("churn") else None
            expected = sandbox.ask("expect")
            sandbox.ask("reset_counts")
            server_before = sandbox.ask("counts")
            profile = work / f"profile-{run}.txt" if args.profile else None
            result, outer = run_guardsync(config_file, work / f"{run}.json", env, work / f"{run}.log", profile)
            server = sandbox.ask("counts")
            if prefect_server is not None and result.get("flow_run_id"):
                result["prefect_tasks"] = prefect_server.task_timings(result["flow_run_id"])
            sandbox.ask("commit")
            verified = sandbox.ask("verify") if not args.no_verify else {"ok": None}
            record = make_record(run, scenario, result, outer, server, server_before, expected, churned, verified,
                                 profiled=profile is not None)
            record["targets"] = evaluate(run, scenario, record, args.latency, concurrency)
            if profile is not None and profile.exists():
                from bench.profile import summarize

                record["profile"] = {"file": str(profile), **summarize(profile)}
            records.append(record)
            print_run(record)
            if not result.get("ok"):
                print(f"   run failed; see {work / (run + '.log')}: {str(result.get('error') or result.get('summary'))[-600:]}")
                break
    finally:
        sandbox.stop()
        if prefect_server is not None:
            prefect_server.stop()
    return {
        "scenario": scenario.__dict__, "latency_s": args.latency, "concurrency": concurrency,
        "prefect": "temporary server per run" if args.ephemeral_prefect else "standing server",
        "started": stamp, "workdir": str(work), "tenant": sandbox.hello["tenant"], "runs": records,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
    }


def make_record(run, scenario, result, outer, server, server_before, expected, churned, verified, profiled=False) -> dict:
    graph_made = split_counts(server["graph"])
    scim_made = split_counts(server["scim"])
    graph_min = expected["graph_delta"] or expected["graph_full"]  # a re-run needs only what changed
    scim_min = {k: v for k, v in expected["scim"].items() if v}
    made_total = sum(graph_made.values()) + sum(scim_made.values())
    minimum_total = sum(graph_min.values()) + sum(scim_min.values())
    stages = result.get("stages") or {}
    return {
        "run": run,
        "ok": bool(result.get("ok")),
        "verified": verified,
        "churn": churned,
        "wall_s": round(outer["wall_s"], 2),
        "prefect_startup_s": result.get("prefect_startup_s"),
        "flow_body_s": result.get("flow_body_s"),
        "stages": stages,
        "prefect_tasks": result.get("prefect_tasks"),
        "transform_cpu_s": transform_cpu(stages),
        "cpu_s": round((result.get("cpu_user_s") or 0) + (result.get("cpu_sys_s") or 0), 2),
        "cpu_user_s": result.get("cpu_user_s"),
        "cpu_sys_s": result.get("cpu_sys_s"),
        # Under --profile the child is py-spy, whose rusage does not cover the run: not measured then.
        "cpu_with_prefect_server_s": None if profiled else round(outer["cpu_with_children_s"], 2),
        "max_rss_mb": result.get("max_rss_mb"),
        "sandbox_cpu_s": round(server["cpu_s"] - server_before["cpu_s"], 2),
        "sandbox_max_rss_mb": server["max_rss_mb"],
        "summary": result.get("summary"),
        "requests": {
            "graph_made": graph_made,
            "scim_made": scim_made,
            "graph_client": split_counts((result.get("requests_made") or {}).get("GraphClient", {})),
            "scim_client": split_counts((result.get("requests_made") or {}).get("ScimClient", {})),
            "graph_minimum": graph_min,
            "graph_minimum_full_read": expected["graph_full"],
            "scim_minimum": scim_min,
            "graph_made_total": sum(graph_made.values()),
            "graph_minimum_total": sum(graph_min.values()),
            "scim_made_total": sum(scim_made.values()),
            "scim_writes_made": writes_of(scim_made),
            "scim_writes_minimum": writes_of(scim_min),
            "made_total": made_total,
            "minimum_total": minimum_total,
            "ratio": round(made_total / minimum_total, 3) if minimum_total else None,
        },
        "expected_changes": expected["changes"],
        "graph_changes": expected.get("graph_changes"),
        "error": result.get("error"),
    }


# -- output -------------------------------------------------------------------------------


def fmt_s(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_run(r: dict) -> None:
    q = r["requests"]
    status = "ok" if r["ok"] else "FAILED"
    check = {True: "state verified", False: f"STATE WRONG ({r['verified'].get('examples')})", None: "not verified"}[r["verified"].get("ok")]
    print(f"-- {r['run']}: {status}, {check}; wall {r['wall_s']:.1f} s (Prefect start-up {fmt_s(r['prefect_startup_s'])} s), "
          f"CPU {r['cpu_s']:.1f} s (+Prefect server {fmt_s(r['cpu_with_prefect_server_s'] and r['cpu_with_prefect_server_s'] - r['cpu_s'])} s), "
          f"peak RSS {fmt_s(r['max_rss_mb'])} MB; sandbox CPU {r['sandbox_cpu_s']:.1f} s", flush=True)
    print(f"   requests: Graph {q['graph_made_total']} (min {q['graph_minimum_total']}), SCIM {q['scim_made_total']} "
          f"(writes {q['scim_writes_made']}, min {q['scim_writes_minimum']}); total {q['made_total']} / {q['minimum_total']} "
          f"= {q['ratio']}")
    for api in ("graph", "scim"):
        made, minimum = q[f"{api}_made"], q[f"{api}_minimum"]
        for key in sorted(set(made) | set(minimum)):
            print(f"      {key:<58} {made.get(key, 0):>7}  min {minimum.get(key, 0):>7}")
    tasks = r.get("prefect_tasks") or {}
    print("   stage                 body wall   body CPU   task run (Prefect)   RSS after")
    for name, stage in r["stages"].items():
        prefect = tasks.get(name, {}).get("wall_s") if isinstance(tasks.get(name), dict) else None
        print(f"      {name:<18} {stage['wall_s']:>9.2f} {stage['cpu_s']:>10.2f} {fmt_s(prefect):>20} {stage.get('rss_mb_after', 0):>10.0f}")
    for name, target in r["targets"].items():
        met = {True: "MET", False: "NOT MET", None: "n/a"}[target["met"]]
        print(f"   target {name}: {target['measured']} (target {target['target']}): {met}")


def print_table(results: list[dict]) -> None:
    stage_names = ["extract", "flatten", "scope", "validate", "plan", "load-users", "load-groups", "load-memberships"]
    print("\n== summary")
    head = (f"{'scenario':<8} {'run':<10} {'Graph made/min':>15} {'SCIM made/min':>14} {'ratio':>6} {'wall s':>7} "
            f"{'start s':>7} " + " ".join(f"{n[:9]:>9}" for n in stage_names) + f" {'CPU s':>7} {'peak MB':>8} {'state':>6}")
    print(head)
    for result in results:
        for r in result["runs"]:
            q = r["requests"]
            stages = " ".join(f"{r['stages'].get(n, {}).get('wall_s', float('nan')):>9.2f}" for n in stage_names)
            print(f"{result['scenario']['name']:<8} {r['run']:<10} {q['graph_made_total']:>7}/{q['graph_minimum_total']:<7} "
                  f"{q['scim_made_total']:>6}/{q['scim_writes_minimum']:<7} {q['ratio']:>6} {r['wall_s']:>7.1f} "
                  f"{fmt_s(r['prefect_startup_s']):>7} {stages} {r['cpu_s']:>7.1f} {fmt_s(r['max_rss_mb']):>8} "
                  f"{'ok' if r['verified'].get('ok') else '-':>6}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run these (repeatable); default: 10k, 10k-brownfield and 100k")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every Graph and SCIM request")
    parser.add_argument("--concurrency", type=int, default=0, help="[sync] write_concurrency (default: guardsync's, 4)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench-results"))
    parser.add_argument("--profile", action="store_true", help="record each run with py-spy (raw stacks in the workdir)")
    parser.add_argument("--no-verify", action="store_true", help="skip checking Atlassian's state after each run")
    parser.add_argument("--ephemeral-prefect", action="store_true",
                        help="no standing Prefect server: each run starts a temporary one, as `guardsync sync` "
                             "does without PREFECT_API_URL (adds ~7-10 s a run here)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.scenario or ["10k", "10k-brownfield", "100k"]:
        result = run_scenario(SCENARIOS[name], args, out_dir)
        results.append(result)
        path = out_dir / f"{name}-{result['started']}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"   written: {path}")
    print_table(results)
    failed = [r for result in results for r in result["runs"] if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
