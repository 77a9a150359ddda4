"""`guardsync demo`: the whole job on the built-in sandbox, no credentials, no network.

A generated tenant (two domains, nested groups, a few bad records) behind a local
Graph emulator, a local Atlassian SCIM server and Organizations API, and three runs of the real flow:
a pilot of one group, the full sync with product access, then a sync after the tenant changes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from guardsync.config import load_settings
from guardsync.sandbox.stack import Sandbox, to_toml
from guardsync.sandbox.tenant import Tenant, generate_tenant

DOMAINS = ("contoso.com", "fabrikam.com")


def run_demo(users: int = 300, workdir: str = ".guardsync-demo") -> int:
    from guardsync.cli import run_flow

    started = time.monotonic()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
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
             "in the Prefect UI, Runs > sync-directory; this demo used a temporary Prefect server, so to keep "
             "the runs start `prefect server start`, export PREFECT_API_URL=http://127.0.0.1:4200/api and run it again")
    return (f"Where to look: {place}. Each run has the task runs extract, flatten, scope, "
            f"validate, plan, plan-access, load-users, load-groups, load-memberships, load-access, and the artifacts 'summary', 'plan', "
            f"'plan-changes', 'gate-results' and 'load-*' (progress). History of this demo: "
            f"guardsync history --config {config_file}")
