"""`guardsync demo`, the README's main job, as a person runs it: a subprocess, no credentials."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_three_syncs_and_prints_their_summaries(tmp_path):
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the demo starts its own temporary server, as on a fresh machine
    guardsync = Path(sys.executable).with_name("guardsync")
    done = subprocess.run([str(guardsync), "demo", "--users", "150", "--workdir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("Summary of run")]
    assert len(summaries) == 3 and all("(sync, completed)" in line for line in summaries)
    assert "users created" in done.stdout and "groups created" in done.stdout
    # Product access: granted on the full sync, and the group renamed in step 3 keeps its product.
    assert "product access granted 5" in done.stdout and "Atlassian may email the users who gained a product" in done.stdout
    last = [line for line in done.stdout.splitlines() if line.strip().startswith("Product access in Atlassian:")][-1]
    assert "(renamed): jira-software@contoso.atlassian.net" in last, last
    assert "renamed groups were re-created" not in done.stdout  # nothing left to grant again by hand
    assert "Where to look: in the Prefect UI" in done.stdout and "guardsync demo --ui" in done.stdout
    assert (tmp_path / "demo" / "state.db").exists()


@pytest.mark.slow
def test_demo_ui_keeps_a_prefect_server_with_the_three_runs_until_interrupted(tmp_path):
    """`guardsync demo --ui` as a newcomer runs it (Prefect's INFO logs on): the runs land on a local
    server that stays up, readable over its REST API with their task runs and artifacts, until SIGINT."""
    import queue
    import signal
    import threading

    import requests

    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(tmp_path / "prefect-client"), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    guardsync = Path(sys.executable).with_name("guardsync")
    demo = subprocess.Popen([str(guardsync), "demo", "--ui", "--users", "150", "--workdir", str(tmp_path / "demo")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()
    seen = []
    try:
        while not seen or not seen[-1].startswith("Prefect UI: "):
            seen.append(lines.get(timeout=600).rstrip("\n"))
        address = seen[-1].split()[2]
        assert address.startswith("http://127.0.0.1:")
        terminal = "\n".join(seen)
        assert terminal.count("Summary of run") == 3, terminal  # once a run, not also through the logger
        assert "no global concurrency limit" not in terminal  # nobody can act on it in the demo
        assert "guardsync demo --ui" not in terminal  # the advice is for demos without a server

        api = f"{address}/api"
        runs = requests.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["sync-directory"]}}},
                             timeout=30).json()
        assert len(runs) == 3 and {run["state_type"] for run in runs} == {"COMPLETED"}
        for run in runs:
            assert run["id"] in terminal  # the runs the demo printed
            artifacts = requests.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
                                      timeout=30).json()
            by_key = {artifact["key"]: artifact for artifact in artifacts}
            assert {"summary", "plan", "plan-changes", "gate-results", "load-users"} <= set(by_key), sorted(by_key)
            assert "| object | created |" in by_key["summary"]["data"]
            tasks = requests.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}},
                                  timeout=30).json()
            assert {"extract", "plan", "load-users"} <= {task["name"].rsplit("-", 1)[0] for task in tasks}
        assert "<html" in requests.get(address, timeout=30).text  # the UI itself is served

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    try:
        requests.get(f"{api}/health", timeout=5)
        up = True
    except requests.ConnectionError:
        up = False
    assert not up, "the server outlived the demo"
