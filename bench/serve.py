"""The benchmark's sandbox, in a process of its own: `python -m bench.serve --users N ...`.

It generates the tenant, starts the Sandbox (Graph emulator and Atlassian SCIM
server, with `--latency` seconds added to every request) and prints one JSON line:
the URLs, the configuration and the environment guardsync needs. Then it answers
commands, one JSON object a line on stdin, one JSON line on stdout:

    {"cmd": "counts"}         requests each server served, by endpoint; this process's CPU
    {"cmd": "reset_counts"}
    {"cmd": "expect"}         the fewest requests the next run needs (bench.model), from the tenant
    {"cmd": "commit"}         the next run has happened: what it should have written is now applied
    {"cmd": "verify"}         compare Atlassian (the SCIM server's store) with what should be applied
    {"cmd": "churn", "fraction": 0.01, "seed": 1}
    {"cmd": "provision", "stale": 0.1, "seed": 3}   brownfield: Atlassian holds every user and group already
    {"cmd": "disable", "seed": 5}   a leaver: one enabled user with an active account disabled in Entra, and when
    {"cmd": "leavers"}        each leaver so far: when it was disabled, and whether Atlassian's account is inactive
    {"cmd": "stop"}

Running apart keeps the sandbox's CPU and memory out of guardsync's figures, and
gives the sandbox a core of its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

from bench import model
from guardsync.sandbox.stack import Sandbox
from guardsync.sandbox.tenant import Tenant, generate_tenant

DOMAINS = ("contoso.com", "fabrikam.com")


def _attributes(user) -> tuple:
    """A stored scim2 user's attributes in the order of model.UserRecord's tail."""
    from scim2_models import EnterpriseUser

    phones = {p.type: p.value for p in reversed(user.phone_numbers or [])}
    enterprise = user[EnterpriseUser]
    return (user.preferred_language or "", phones.get("work") or "", phones.get("mobile") or "",
            (enterprise.department if enterprise is not None else None) or "")


class Server:
    """A started Sandbox and what its runs should do; each command is a method (tests call them directly)."""

    def __init__(self, tenant: Tenant, sandbox: Sandbox, generated_in: float = 0.0):
        self.tenant, self.sandbox, self.generated_in = tenant, sandbox, generated_in
        self.applied = model.Applied()
        self.pending: model.Applied | None = None
        self.seen: model.TenantPicture | None = None  # the tenant as the last run read it
        self.pending_seen: model.TenantPicture | None = None
        self.existing: model.Applied | None = model.Applied()  # held by Atlassian before the first run; None after it
        self.disabled: dict[str, float] = {}  # leavers made by `disable`: Entra id -> when (time.time())

    def hello(self) -> dict:
        t = self.tenant
        config = self.sandbox.config("sqlite:///placeholder.db")
        return {
            "ready": True,
            "config": config,
            "env": self.sandbox.environment(),
            "tenant": {"users": len(t.users), "groups": len(t.groups),
                       "direct_memberships": sum(len(m) for m in t.members.values()),
                       "generated_s": round(self.generated_in, 2)},
        }

    def counts(self, _):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"graph": dict(self.sandbox.graph.requests), "scim": dict(self.sandbox.scim.requests),
                "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024}

    def reset_counts(self, _):
        self.sandbox.graph.reset_counts()
        self.sandbox.scim.reset_counts()
        return {}

    def expect(self, _):
        desired = model.desired_state(self.tenant)
        writes, self.pending = model.scim_minimum(self.applied, desired, self.existing)
        self.pending_seen = model.picture(self.tenant)
        graph_changes = model.graph_changes(self.seen, self.pending_seen) if self.seen else None
        return {
            "graph_full": model.graph_minimum_full(self.tenant),
            "graph_delta": model.graph_minimum_delta(graph_changes) if graph_changes else None,
            "graph_changes": graph_changes,
            "scim": writes.by_endpoint(),
            "changes": writes.counts(),
        }

    def commit(self, _):
        if self.pending is not None:
            self.applied, self.pending, self.existing = self.pending, None, None
            self.seen, self.pending_seen = self.pending_seen, None
        return {}

    def verify(self, _):
        """Atlassian's users and groups against what should be applied; a few examples of each difference."""
        storage = self.sandbox.scim.storage
        with storage.lock:
            stored_users = list(storage._resources.get("User", {}).values())
            stored_groups = list(storage._resources.get("Group", {}).values())
        by_scim_id = {u.id: u.external_id for u in stored_users}
        problems: list[str] = []
        users = {u.external_id: u for u in stored_users}
        for uid, record in self.applied.users.items():
            user = users.get(uid)
            if user is None:
                problems.append(f"user {record[0]} missing")
            elif user.user_name != record[0] or bool(user.active) != record[5] or (user.title or "") != record[4]:
                problems.append(f"user {record[0]} differs (userName {user.user_name}, active {user.active})")
            elif _attributes(user) != record[6:]:
                problems.append(f"user {record[0]} differs in its attributes ({_attributes(user)} != {record[6:]})")
        if len(users) != len(self.applied.users):
            problems.append(f"{len(users)} users in Atlassian, {len(self.applied.users)} expected")
        groups = {g.display_name: g for g in stored_groups}
        for gid, (name, members) in self.applied.groups.items():
            group = groups.get(name)
            if group is None:
                problems.append(f"group {name} missing")
                continue
            have = {by_scim_id.get(m.value) for m in group.members or []}
            if have != set(members):
                problems.append(f"group {name}: {len(have - members)} extra, {len(members - have)} missing members")
        if len(groups) != len(self.applied.groups):
            problems.append(f"{len(groups)} groups in Atlassian, {len(self.applied.groups)} expected")
        return {"ok": not problems, "problems": len(problems), "examples": problems[:10]}

    def provision(self, command):
        """Fill Atlassian as Atlassian's own Entra sync left it before guardsync's first run: every user
        (no externalId), `stale` of them with an outdated title, every group with its members."""
        import random

        rng = random.Random(command.get("seed", 3))
        desired = model.desired_state(self.tenant)
        stale = set(rng.sample(sorted(desired.users), int(len(desired.users) * command.get("stale", 0.1))))
        users = []
        for uid, (upn, display, given, family, title, active, *_attributes) in desired.users.items():
            user = {"userName": upn, "emails": [{"value": upn, "type": "work", "primary": True}], "active": active,
                    "displayName": display, "name": {"givenName": given, "familyName": family}}
            if title or uid in stale:
                user["title"] = "Former Title" if uid in stale else title
            users.append(user)
        upn_of = {uid: record[0] for uid, record in desired.users.items()}
        groups = {name: [upn_of[m] for m in members] for name, members in desired.groups.values()}
        self.sandbox.scim.provision(users, groups)
        self.existing = model.Applied(dict(desired.users), dict(desired.groups))
        return {"users": len(users), "groups": len(groups), "stale_titles": len(stale)}

    def disable(self, command):
        """Disable one enabled user whose Atlassian account is active (bench.latency's leaver); the moment of
        the change in Entra is this process's clock, the harness's too (one machine)."""
        import random

        active = {u.external_id for u in self._stored_users() if u.active}
        with self.tenant.lock:
            candidates = sorted(uid for uid, u in self.tenant.users.items() if u["accountEnabled"] and uid in active)
            uid = random.Random(command.get("seed", 5)).choice(candidates)
            self.tenant.update_user(uid, accountEnabled=False)
            at = time.time()
        self.disabled[uid] = at
        return {"id": uid, "at": at}

    def leavers(self, _):
        """Each user `disable` disabled: {id: [disabled at, account active in Atlassian now]}."""
        active = {u.external_id: bool(u.active) for u in self._stored_users()}
        return {uid: [at, active.get(uid, False)] for uid, at in self.disabled.items()}

    def _stored_users(self) -> list:
        storage = self.sandbox.scim.storage
        with storage.lock:
            return list(storage._resources.get("User", {}).values())

    def churn(self, command):
        return model.churn(self.tenant, command.get("fraction", 0.01), command.get("seed", 1))

    def stop(self, _=None):
        self.sandbox.stop()
        return {}


def quiet_full_collections() -> None:
    """Keep Python's full garbage collections from stalling the sandbox in mid-benchmark.

    The store grows to millions of objects (a 100k tenant's users, and a million group
    members once loaded). Each full collection walks all of them while holding the GIL,
    so every request in flight waits: 20 of them took 17 s in the 100k scenario, up to
    2.6 s at a time. What a request leaves behind dies young and is still collected young;
    the generated tenant is frozen out of collections, and the oldest generation is left
    to grow (this process lives for one scenario).
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--memberships", type=int, required=True)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--latency", type=float, default=0.020, help="seconds every request takes at least")
    args = parser.parse_args(argv)
    started = time.monotonic()
    tenant = generate_tenant(users=args.users, groups=args.groups, memberships=args.memberships,
                             depth=args.depth, seed=args.seed, domains=DOMAINS, bad_records=False)
    generated_in = time.monotonic() - started
    quiet_full_collections()
    server = Server(tenant, Sandbox(tenant, atlassian_domains=set(DOMAINS), latency=args.latency).start(), generated_in)
    out = sys.stdout
    out.write(json.dumps(server.hello()) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "stop":
            break
        try:
            answer = getattr(server, command["cmd"])(command)
        except Exception as exc:  # answered, so the harness shows it instead of hanging
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
