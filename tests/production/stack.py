"""A production-shaped Prefect stack on this machine, for the end-to-end test.

PostgreSQL database, `prefect server start` on it, `prefect` CLI calls, process workers, a
webhook receiver standing in for the admins' chat, and the prefect.yaml rendered for sandboxes.
Every process is started in its own session and stopped by its id (terminate, then kill).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"

QUIET = {  # nothing phones home, whatever runs
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without its Prefect and sandbox settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "GUARDSYNC_", "REQUESTS_CA_BUNDLE"))}
    env.update(QUIET)
    env.update(extra)
    return env


# -- PostgreSQL ------------------------------------------------------------------------


def create_database(name: str) -> str:
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- processes ---------------------------------------------------------------------------


@dataclass
class Processes:
    """The long-running processes of the stack: started in their own session, stopped by pid."""

    log_dir: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        """Newest first: workers (and the flow runs they spawned) before the server."""
        for name, process in reversed(self.started):
            stop(process)
        self.started.clear()

    def tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group we created for it (its own session), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)  # pgid == pid: start_new_session made it the group leader
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def prefect_cli(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 90) -> str:
    result = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def wait_healthy(api_url: str, process: subprocess.Popen, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise AssertionError(f"prefect server exited with {process.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"prefect server not healthy after {timeout}s")


def flow_run_id_from(output: str) -> str:
    """`prefect deployment run` prints the new run's UUID."""
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, f"no flow run id in:\n{output}"
    return match.group(1)


# -- prefect.yaml for the sandboxes --------------------------------------------------------


def render_prefect_yaml(source: Path, directories: dict[str, dict]) -> dict:
    """The repository's prefect.yaml, with each named deployment pointed at a sandbox.

    `directories` maps a deployment name to the sandbox's configuration (Sandbox.config()):
    tenant, client id, the emulator's authority and Graph URLs, the SCIM URL; its schedules paused (the
    test starts its runs itself). Everything else (pool, schedule intervals, concurrency, secret and
    state references, pull step) stays as written.
    """
    data = json.loads(json.dumps(yaml.safe_load(source.read_text())))  # anchors merged, nothing shared
    names = [d["name"] for d in data["deployments"]]
    assert set(directories) <= set(names), f"prefect.yaml defines {names}, the test needs {sorted(directories)}"
    for deployment in data["deployments"]:
        sandbox = directories.get(deployment["name"])
        if sandbox is None:
            continue
        settings = deployment["parameters"]["settings"]
        for key in ("tenant_id", "client_id", "authority_host", "graph_url"):
            settings["entra"][key] = sandbox["entra"][key]
        settings["atlassian"]["scim_url"] = sandbox["atlassian"]["scim_url"]
        for schedule in deployment.get("schedules", []):  # the test starts every run itself: none at minute marks
            schedule["active"] = False
    data["deployments"] = [d for d in data["deployments"] if d["name"] in directories]
    return data


def secret_name(reference: str) -> str:
    assert reference.startswith("prefect:"), f"{reference} should be a prefect:SECRET_BLOCK reference"
    return reference.removeprefix("prefect:")


# -- events ----------------------------------------------------------------------------------


def read_events(api_url: str, event_prefix: str, since: str, resource_id: str | None = None) -> list[dict]:
    """Events from the server's event store (all pages), oldest first."""
    body: dict = {"filter": {"event": {"prefix": [event_prefix]}, "occurred": {"since": since},
                             "order": "ASC"}, "limit": 50}
    if resource_id:
        body["filter"]["resource"] = {"id": [resource_id]}
    events = []
    page = httpx.post(f"{api_url}/events/filter", json=body, timeout=10).raise_for_status().json()
    while True:
        events += page["events"]
        if not page.get("next_page"):
            break
        page = httpx.get(page["next_page"], timeout=10).raise_for_status().json()
    return events


# -- the admins' webhook ---------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP endpoint on loopback that records every request it gets (the admins' chat)."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                received.append({"path": self.path, "body": self.rfile.read(length).decode("utf-8", "replace"),
                                 "at": time.time()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/guardsync-admins"

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
