"""`guardsync demo`: the whole job on the built-in sandbox, no credentials, no network.

A generated tenant (two domains, nested groups, a few bad records) behind a local
Graph emulator, a local Atlassian SCIM server and Organizations API, and three runs of the real flow:
a pilot of one group, the full sync with product access, then a sync after the tenant changes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import requests

from guardsync.config import Settings, load_settings
from guardsync.errors import GuardsyncError
from guardsync.sandbox.stack import Sandbox, to_toml
from guardsync.sandbox.tenant import Tenant, generate_tenant

DOMAINS = ("contoso.com", "fabrikam.com")


def run_demo(run_flow: Callable[[Settings], int], users: int = 300, workdir: str = ".guardsync-demo",
             ui: bool = False) -> int:
    """`run_flow` runs one sync and prints its summary (the command line's own: the demo sits below it).

    With `ui`, the runs go to a local Prefect server with its UI, kept up afterwards until Ctrl-C.
    """
    started = time.monotonic()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not ui:
        return _run_steps(run_flow, users, work, started)
    try:
        with prefect_ui_server(work) as address:
            print(f"Prefect server with its UI: {address} (its log: {work / 'prefect-server.log'})")
            status = _run_steps(run_flow, users, work, started)
            print(f"\nPrefect UI: {address}  (up until Ctrl-C)", flush=True)
            wait_for_interrupt()
    except KeyboardInterrupt:  # before the runs were done
        print("\ndemo interrupted; the Prefect server is stopped")
        return 130
    return status


def _run_steps(run_flow: Callable[[Settings], int], users: int, work: Path, started: float) -> int:
    state = work / "state.db"
    state.unlink(missing_ok=True)  # each demo starts from an empty Atlassian directory

    tenant = generate_tenant(users=users, groups=max(8, users // 15), seed=7, domains=DOMAINS)
    sandbox = Sandbox(tenant, atlassian_domains=set(DOMAINS)).start()
    sandbox.export()
    try:
        access = demo_access(tenant)
        steps = [
            ("1. Pilot: sync only the group 'Pilot'", {"groups": ["Pilot"]}, None, None),
            ("2. Full sync: all users and all groups, and product access ([access])", {}, access, None),
            ("3. The tenant changes, and the next scheduled run catches up", {}, access, change_tenant),
        ]
        for title, sync, products, before in steps:
            if before:
                print(f"\n   Changes in Entra: {before(tenant)}")
            config_file = work / "guardsync.toml"
            config_file.write_text(to_toml(sandbox.config(f"sqlite:///{state}", products, **sync)), encoding="utf-8")
            print(f"\n== {title}  (guardsync sync --config {config_file})")
            status = run_flow(load_settings(config_file))
            if status != 0:
                print(f"demo stopped: the run exited {status}")
                return status
            print(f"   Atlassian now holds {len(sandbox.scim.users())} users and {len(sandbox.scim.groups())} groups; "
                  f"requests so far: Graph {sandbox.graph.total()}, SCIM {sandbox.scim.total()}, "
                  f"Organizations API {sandbox.org.total()}")
            if products:
                held = "; ".join(f"{group}: {', '.join(sorted(p))}" for group, p in sorted(sandbox.org.grants().items()))
                print(f"   Product access in Atlassian: {held or 'none'}")
    finally:
        sandbox.stop()
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Configuration and state: {work}")
    print(where_to_look(config_file))
    return 0


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def prefect_ui_server(work: Path, startup_seconds: float = 180.0) -> Iterator[str]:
    """A local Prefect server with its UI on a free loopback port, its database in `work` (fresh each
    demo); this process's flow runs report to it. Yields the UI's address; stops the server on exit."""
    # Ctrl-C or SIGTERM, whenever it comes, unwinds to the `finally` that stops the server. (A process
    # started in the background of a script inherits SIGINT ignored: it is honoured all the same.)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    port = free_loopback_port()
    home = work / "prefect"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    address = f"http://127.0.0.1:{port}"
    log_path = work / "prefect-server.log"
    with log_path.open("w", encoding="utf-8") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--ui",
             "--no-scheduler", "--no-late-runs"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_seconds
        while not _healthy(address):
            if server.poll() is not None or time.monotonic() > deadline:
                raise GuardsyncError(f"the Prefect server did not start (see {log_path}); run the demo without --ui")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = f"{address}/api"  # before the first flow run reads Prefect's settings
        yield address
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _healthy(address: str) -> bool:
    try:
        return requests.get(f"{address}/api/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_for_interrupt() -> None:
    """Until Ctrl-C (SIGINT) or SIGTERM (see `prefect_ui_server`); either ends the demo normally."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping the Prefect server.")


def demo_access(tenant: Tenant) -> dict[str, list[str]]:
    """[access.groups] of the demo: two groups by name, and by object id the group step 3 renames (an id
    keeps naming it after the rename; its re-created group gets the products before the old one goes)."""
    renamed = next(gid for gid, g in tenant.groups.items() if g["displayName"] not in ("Pilot",))
    return {"Engineering All": ["jira-software", "confluence"],
            "Support All": ["jira-servicemanagement@support-contoso.atlassian.net", "confluence"],
            renamed: ["jira-software"]}


def change_tenant(tenant: Tenant) -> str:
    """A day of directory life: joiners, a leaver, a rename, a disabled account, a reorganised group."""
    rng_users = sorted(uid for uid, u in tenant.users.items()
                       if u["accountEnabled"] and "#EXT#" not in u["userPrincipalName"]
                       and (u.get("mail") or "").endswith(DOMAINS))
    pilot = next(gid for gid, g in tenant.groups.items() if g["displayName"] == "Pilot")
    for n in range(3):
        new = tenant.add_user(userPrincipalName=f"new.joiner{n}@contoso.com", mail=f"new.joiner{n}@contoso.com",
                              displayName=f"New Joiner {n}", givenName="New", surname=f"Joiner {n}",
                              jobTitle="Engineer", accountEnabled=True, userType="Member")
        tenant.add_member(pilot, new)
    leaver, disabled, renamed = rng_users[0], rng_users[1], rng_users[2]
    tenant.delete_user(leaver)
    tenant.update_user(disabled, accountEnabled=False)
    old = tenant.users[renamed]["userPrincipalName"]
    local, domain = old.split("@")
    tenant.update_user(renamed, userPrincipalName=f"{local}.renamed@{domain}", mail=f"{local}.renamed@{domain}")
    group_id = next(gid for gid, g in tenant.groups.items() if g["displayName"] not in ("Pilot",))
    old_name = tenant.groups[group_id]["displayName"]
    tenant.rename_group(group_id, old_name + " (renamed)")
    return (f"3 joiners added to Pilot, 1 user deleted, 1 disabled, {old} renamed, "
            f"group '{old_name}' renamed")


def where_to_look(config_file: Path) -> str:
    api = os.environ.get("PREFECT_API_URL")
    place = (f"in the Prefect UI at {api.removesuffix('/api')}, Runs > sync-directory" if api else
             "in the Prefect UI, Runs > sync-directory; this demo used a temporary Prefect server that is gone "
             "now: to look at the runs in the UI, run `guardsync demo --ui` (or `make demo-ui`), which keeps a "
             "local server up until Ctrl-C")
    return (f"Where to look: {place}. Each run has the task runs extract, flatten, scope, "
            f"validate, plan, plan-access, load-users, load-groups, load-memberships, load-access, and the artifacts 'summary', 'plan', "
            f"'plan-changes', 'gate-results' and 'load-*' (progress). History of this demo: "
            f"guardsync history --config {config_file}")
