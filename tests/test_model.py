"""The model test: random histories of Entra changes, hand edits in Atlassian, configuration changes and runs,
each run checked by an oracle written from DESIGN.md alone (tests/oracle.py).

A history starts from a small generated tenant (8-12 users, 3-5 groups, some nesting, a few disabled users, a
guest and a user on the tenant's initial domain, two groups mapped to products), sometimes with an Atlassian
that already holds accounts and groups, and plays up to GUARDSYNC_MODEL_STEPS rounds. A round is what happens
between two runs, then the run:

- Entra changes (users created, renamed, retitled, disabled, enabled, deleted, handed over; groups created,
  renamed, re-cased, deleted, re-created under their old name; members and nesting added and removed);
- hand edits in Atlassian (accounts made, deleted, their email edited; groups made and deleted; grants made
  and revoked);
- a configuration change ([access.groups], the pilot groups, the domains);
- a run: delta, `--full`, a dry run then the sync, a run killed right after its K-th write then run again, a
  run whose load fails on some writes and that Prefect retries.

After every run the oracle checks Atlassian; then the same run again must write nothing. A history that broke
nothing ends with a full read, which must bring everything in line. The real flow runs in-process against the
sandbox (HTTPS on loopback) inside the session's Prefect test server.

Budget: GUARDSYNC_MODEL_EXAMPLES histories of up to GUARDSYNC_MODEL_STEPS rounds (see the defaults below).
`make test` draws the same histories every time (derandomize, no example database: CI is reproducible);
`make test-deep` runs ten times as many, drawn afresh each time (GUARDSYNC_MODEL_DEEP=1), and shrinks a
failure to a short history. Every failing history found becomes a test in tests/test_model_regressions.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from guardsync.config import parse_settings
from guardsync.sandbox.http import Fault
from guardsync.sandbox.stack import Sandbox
from guardsync.sandbox.tenant import _empty_tenant
from tests.conftest import run_sync
from tests.oracle import ENABLED, EXCLUDED, Atlassian, Expected, Fate, Ledger, Scope, check, expect, same_counts

DEEP = os.environ.get("GUARDSYNC_MODEL_DEEP", "") not in ("", "0")
# About 2.3 runs a round (the run, the same run again, a dry run now and then) at 2-4 s a run on 2 cores: the default
# budget is some 50 runs, what fits in about two minutes of `make test`.
EXAMPLES = int(os.environ.get("GUARDSYNC_MODEL_EXAMPLES", 40 if DEEP else 4))  # histories
STEPS = int(os.environ.get("GUARDSYNC_MODEL_STEPS", 8 if DEEP else 5))  # rounds, at most, in each

DOMAINS = ("contoso.com", "fabrikam.com")  # verified in Entra and in Atlassian
GIVEN = ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo", "kim", "lu", "max", "ned", "ola", "pia")
TITLES = ("Engineer", "Designer", "Analyst", None)
PRODUCTS = ("jira-software", "confluence", "jira-servicemanagement@support-contoso.atlassian.net")  # configurable
HAND_WORKSPACES = ("ws-jira", "ws-confluence", "ws-jsm-main", "ws-jsm-support")  # what an admin grants by hand
SCIM_WRITES = ("POST", "PUT", "PATCH", "DELETE")
# Faults a Prefect retry recovers from: a non-transient answer (401) to a write fails its load task once.
RETRY_FAULTS = (("scim", Fault("POST", r"/Users\?$", 401)), ("scim", Fault("PUT", r"/Users/", 401)),
                ("scim", Fault("POST", r"/Groups\?$", 401)), ("scim", Fault("PATCH", r"/Groups/", 401)),
                ("scim", Fault("DELETE", r"/Groups/", 401)), ("org", Fault("POST", r"/role-assignments/assign$", 401)))
FAULT_BODY = '{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}'


EXCLUDED_FATE = Fate(EXCLUDED, None)


class Killed(SystemExit):
    """The process dies: raised in the client right after the K-th write Atlassian applied."""


class Violation(AssertionError):
    pass


# == the world: a sandbox, a tenant, a configuration, and what was done by hand ============================


def build_tenant(seed: int, users: int, groups: int):
    """A small tenant: users on both domains (one on the initial domain, one guest), groups with nesting."""
    rng = random.Random(seed)
    tenant = _empty_tenant(rng, list(DOMAINS), bad_records=False)
    for n in range(users):
        domain = DOMAINS[0] if n % 3 else DOMAINS[1]
        if n == users - 1:
            domain = tenant.initial_domain  # excluded by default (Atlassian cannot verify it)
        given = GIVEN[n % len(GIVEN)]
        tenant.add_user(userPrincipalName=f"{given}.{n}@{domain}", mail=f"{given}.{n}@{domain}",
                        displayName=f"{given.title()} {n}", givenName=given.title(), surname=f"N{n}",
                        jobTitle=rng.choice(TITLES), accountEnabled=rng.random() > 0.15)
    tenant.add_user(userPrincipalName=f"guest_gmail.com#EXT#@{tenant.initial_domain}", mail="guest@gmail.com",
                    displayName="Guest", userType="Guest")
    user_ids = [uid for uid, u in tenant.users.items() if u["userType"] == "Member"]
    group_ids = [tenant.add_group(f"Team {n}") for n in range(groups)]
    for uid in user_ids:
        for gid in rng.sample(group_ids, rng.choice((1, 1, 2))):
            tenant.add_member(gid, uid)
    for _ in range(rng.randint(1, 2)):
        parent, child = rng.sample(group_ids, 2)
        tenant.add_member(parent, child)  # nesting (a cycle now and then)
    return tenant


class World:
    """One history's sandbox and everything the oracle needs besides it. Each public method is one step
    kind; arguments are plain integers that pick among what exists (modulo), so a history replays exactly."""

    def __init__(self, seed: int, users: int, groups: int, brownfield: bool = False):
        self.tenant = build_tenant(seed, users, groups)
        self.sandbox = Sandbox(self.tenant, atlassian_domains=set(DOMAINS)).start()
        self._saved_env = {name: os.environ.get(name) for name in self.sandbox.environment()}
        os.environ.update(self.sandbox.environment())
        self.directory = Path(tempfile.mkdtemp(prefix="guardsync-model-"))
        self.state_file = self.directory / "state.db"
        self.pilot: list[str] = []  # [sync] groups, by object id ([] = all)
        self.domains: list[str] = []
        groups_made = list(self.tenant.groups)  # product access is where most of a history's trouble lies: start with some
        self.access: dict[str, list[str]] = {groups_made[0]: [PRODUCTS[seed % 3]], groups_made[1]: list(PRODUCTS[:2])}
        self.ledger = Ledger(entra_users_ever=set(self.tenant.users))
        self.tainted_users: set[str] = set()  # edited by hand since the last full read
        self.tainted_groups: set[str] = set()
        self.last_view: tuple[dict, dict] | None = None  # Expected.view() at the last completed run
        self.revoked_since_run: set[tuple[str, str]] = set()  # (SCIM group id, workspace) revoked by hand
        self.upns_ever: set[str] = set()  # names a hand-over or a rename may take again
        self.group_names_ever: set[str] = set()
        self._remember_names()
        self.dirty = True  # changed since the last completed run
        self.counter = 0
        self.runs = 0
        self.run_seconds = 0.0
        self.kills = self.retries = 0  # troubled runs that were killed, or retried, for real
        if brownfield:
            self._populate()

    def close(self) -> None:
        self.sandbox.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def next(self) -> int:
        self.counter += 1
        return self.counter

    def settled(self) -> bool:
        """Nothing left for a full read to check: a run completed since the last change, and nothing edited by
        hand waits for a full read."""
        return not self.dirty and not self.tainted_users and not self.tainted_groups

    # -- reading ----------------------------------------------------------------------------------------
    def config(self) -> dict:
        config = self.sandbox.config(f"sqlite:///{self.state_file}", self.access, groups=list(self.pilot),
                                     domains=list(self.domains), max_deactivations=1000)
        config["access"]["max_revocations"] = 1000  # the guards are not under test here
        return config

    def expected(self) -> Expected:
        return expect(self.tenant, self.config(), self.sandbox.org.workspaces.values())

    def users(self) -> list[str]:
        return [uid for uid, u in self.tenant.users.items() if u["userType"] == "Member"]

    def groups(self) -> list[str]:
        return list(self.tenant.groups)

    def upn_taken(self, upn: str) -> bool:
        return any((u["userPrincipalName"] or "").casefold() == upn.casefold() for u in self.tenant.users.values())

    def group_name_taken(self, name: str) -> bool:
        return any(g["displayName"].casefold() == name.casefold() for g in self.tenant.groups.values())

    def retired_upns(self) -> list[str]:
        """Identifiers Entra users held once and no user holds now (a hand-over takes one)."""
        return sorted(u for u in self.upns_ever if not self.upn_taken(u) and u.rpartition("@")[2] in DOMAINS)

    def retired_group_names(self) -> list[str]:
        return sorted(n for n in self.group_names_ever if not self.group_name_taken(n))

    def _remember_names(self) -> None:
        self.upns_ever |= {u["userPrincipalName"] for u in self.tenant.users.values()}
        self.group_names_ever |= {g["displayName"] for g in self.tenant.groups.values()}

    # -- Entra ------------------------------------------------------------------------------------------
    def entra(self, kind: str, a: int, b: int) -> None:
        self.dirty = True
        self._remember_names()
        getattr(self, f"entra_{kind}")(a, b)
        self._remember_names()
        self.ledger.entra_users_ever |= set(self.tenant.users)

    def entra_add_user(self, a: int, b: int) -> None:
        n = self.next()
        given = GIVEN[a % len(GIVEN)]
        upn = f"{given}.x{n}@{DOMAINS[a % 2]}"
        uid = self.tenant.add_user(userPrincipalName=upn, mail=upn, displayName=f"{given.title()} X{n}",
                                   givenName=given.title(), surname=f"X{n}", jobTitle=TITLES[b % len(TITLES)],
                                   accountEnabled=b % 5 != 4)
        if self.groups():
            self.tenant.add_member(self.groups()[b % len(self.groups())], uid)

    def names_free_for_rename(self) -> list[str]:
        """Retired identifiers a renamed user may take: free in Atlassian, held by an account made by hand (adopted),
        or held by the account of an in-scope user renamed away (the run renames that account first). A name still held by a leaver's account is not (nor one
        of a disabled user, whose account DESIGN "may" update): DESIGN hands such a name on only to a user created
        with it in the same round (entra_handover)."""
        holders = {u["userName"].casefold(): u.get("externalId") for u in self._scim_users()}
        fates = self.expected().users
        return [upn for upn in self.retired_upns()
                if upn.casefold() not in holders or not holders[upn.casefold()]  # free, or a hand-made account's
                or fates.get(holders[upn.casefold()], EXCLUDED_FATE).state == ENABLED]

    def entra_rename_user(self, a: int, b: int, old_name: bool = False) -> None:
        uid = self.users()[a % len(self.users())]
        retired = self.names_free_for_rename()
        if old_name and retired:
            upn = retired[b % len(retired)]  # a name another user gave up
        else:
            given = self.tenant.users[uid]["givenName"].lower()
            upn = f"{given}.r{self.next()}@{DOMAINS[b % 2]}"
        self.tenant.update_user(uid, userPrincipalName=upn, mail=upn, displayName=f"{upn.split('@')[0].title()}")

    def entra_rename_user_to_old_name(self, a: int, b: int) -> None:
        self.entra_rename_user(a, b, old_name=True)

    def entra_retitle_user(self, a: int, b: int) -> None:
        uid = self.users()[a % len(self.users())]
        self.tenant.update_user(uid, jobTitle=f"Title {b % 7}")

    def entra_toggle_user(self, a: int, b: int) -> None:
        uid = self.users()[a % len(self.users())]
        self.tenant.update_user(uid, accountEnabled=not self.tenant.users[uid]["accountEnabled"])

    def entra_delete_user(self, a: int, b: int) -> None:
        if len(self.users()) > 2:
            self.tenant.delete_user(self.users()[a % len(self.users())])

    def entra_handover(self, a: int, b: int) -> None:
        """A leaver deleted and a new user created with the leaver's identifier, in one round (into the leaver's
        first group, or none)."""
        uid = self.users()[a % len(self.users())]
        leaver = self.tenant.users[uid]
        groups = [gid for gid, members in self.tenant.members.items() if uid in members]
        self.tenant.delete_user(uid)
        n = self.next()
        new = self.tenant.add_user(userPrincipalName=leaver["userPrincipalName"], mail=leaver["mail"],
                                   displayName=f"Successor {n}", givenName="Successor", surname=f"S{n}",
                                   jobTitle=TITLES[b % len(TITLES)], accountEnabled=True)
        for gid in groups[:1] if b % 3 != 2 else []:
            self.tenant.add_member(gid, new)

    def entra_add_group(self, a: int, b: int) -> None:
        gid = self.tenant.add_group(f"Team {100 + self.next()}")
        users = self.users()
        for uid in {users[a % len(users)], users[b % len(users)]}:
            self.tenant.add_member(gid, uid)

    def entra_rename_group(self, a: int, b: int, old_name: bool = False) -> None:
        gid = self.groups()[a % len(self.groups())]
        retired = self.retired_group_names()
        name = retired[b % len(retired)] if old_name and retired else f"Team {100 + self.next()}"
        self.tenant.rename_group(gid, name)

    def entra_rename_group_to_old_name(self, a: int, b: int) -> None:
        self.entra_rename_group(a, b, old_name=True)

    def entra_recase_group(self, a: int, b: int) -> None:
        """A change of letter case only: not a rename."""
        gid = self.groups()[a % len(self.groups())]
        self.tenant.rename_group(gid, self.tenant.groups[gid]["displayName"].swapcase())

    def entra_delete_group(self, a: int, b: int) -> None:
        if len(self.groups()) > 1:
            self._drop_group(self.groups()[a % len(self.groups())])

    def entra_recreate_group(self, a: int, b: int) -> None:
        """A group deleted and a new one created with its name (and some members), in one round."""
        gid = self.groups()[a % len(self.groups())]
        name = self.tenant.groups[gid]["displayName"]
        was_configured = self.access.get(gid)
        self._drop_group(gid)
        new = self.tenant.add_group(name)
        users = self.users()
        for uid in {users[b % len(users)], users[(b // 7) % len(users)]}:
            self.tenant.add_member(new, uid)
        if was_configured and b % 3 != 2 and not self.pilot:
            self.access[new] = was_configured  # the admin points the mapping at the new group

    def _drop_group(self, gid: str) -> None:
        """Delete an Entra group; the admin takes it out of the configuration in the same breath."""
        self.tenant.delete_group(gid)
        self.access.pop(gid, None)
        if gid in self.pilot:
            self.pilot.remove(gid)
            self._prune_access()

    def entra_add_member(self, a: int, b: int) -> None:
        users = self.users()
        self.tenant.add_member(self.groups()[a % len(self.groups())], users[b % len(users)])

    def entra_remove_member(self, a: int, b: int) -> None:
        gid = self.groups()[a % len(self.groups())]
        members = self.tenant.members.get(gid, [])
        if members:
            self.tenant.remove_member(gid, members[b % len(members)])

    def entra_nest(self, a: int, b: int) -> None:
        groups = self.groups()
        parent, child = groups[a % len(groups)], groups[b % len(groups)]
        if parent != child:
            self.tenant.add_member(parent, child)

    # -- Atlassian, by hand -------------------------------------------------------------------------------
    def hand(self, kind: str, a: int, b: int) -> None:
        self.dirty = True
        getattr(self, f"hand_{kind}")(a, b)

    def _scim_users(self) -> list[dict]:
        """Atlassian's accounts in the order of the Entra users they belong to (by id, else by name), strangers last:
        an index picks the same person in Entra rules and in hand edits, so histories make them meet."""
        order = {uid: n for n, uid in enumerate(self.users())}
        order |= {self.tenant.users[uid]["userPrincipalName"].casefold(): n for uid, n in list(order.items())}
        return sorted(self.sandbox.scim.users(), key=lambda u: order.get(u.get("externalId"),
                                                                        order.get(u["userName"].casefold(), len(order))))

    def _scim_groups(self) -> list[dict]:
        """Atlassian's groups in the order of their Entra groups (by id, else by name), the rest last."""
        order = {gid: n for n, gid in enumerate(self.groups())}
        order |= {self.tenant.groups[gid]["displayName"].casefold(): n for gid, n in list(order.items())}
        return sorted(self.sandbox.scim.groups(), key=lambda g: order.get(g.get("externalId"),
                                                                          order.get(g["displayName"].casefold(), len(order))))

    def _taint_user_of(self, account: dict) -> None:
        """Entra users a hand edit of this account concerns: the one whose id it carries, the one whose name it has."""
        if account.get("externalId"):
            self.tainted_users.add(account["externalId"])
        for uid, user in self.tenant.users.items():
            if (user["userPrincipalName"] or "").casefold() == account["userName"].casefold():
                self.tainted_users.add(uid)

    def _taint_group_of(self, group: dict) -> None:
        if group.get("externalId"):
            self.tainted_groups.add(group["externalId"])
        for gid, entra in self.tenant.groups.items():
            if entra["displayName"].casefold() == group["displayName"].casefold():
                self.tainted_groups.add(gid)

    def hand_make_account(self, a: int, b: int) -> None:
        """An admin invites someone Entra knows (adopted on a full read, or when guardsync next writes that user)."""
        taken = {u["userName"].casefold() for u in self._scim_users()}
        known = [self.tenant.users[uid]["userPrincipalName"] for uid in self.users()] + self.retired_upns()
        known = [upn for upn in known if upn.casefold() not in taken and upn.rpartition("@")[2] in DOMAINS]
        if not known:
            return self.hand_make_stranger(a, b)
        upn = known[a % len(known)]
        account = self.sandbox.scim.add_user(_scim_user(upn.upper() if b % 4 == 1 else upn, active=b % 5 != 2))
        self._taint_user_of(account)

    def hand_make_stranger(self, a: int, b: int) -> None:
        """An admin invites someone Entra does not know: guardsync never touches that account."""
        account = self.sandbox.scim.add_user(_scim_user(f"hand.{self.next()}@{DOMAINS[0]}", active=True))
        self.ledger.foreign_users[account["id"]] = account

    def hand_delete_account(self, a: int, b: int) -> None:
        users = self._scim_users()
        if not users:
            return
        account = users[a % len(users)]
        self.sandbox.scim.delete_by_hand("User", account["id"])
        self.ledger.deleted_by_hand.add(account["id"])
        self.ledger.foreign_users.pop(account["id"], None)
        self._taint_user_of(account)

    def hand_edit_email(self, a: int, b: int) -> None:
        """The primary email of a managed account changed in Atlassian: it no longer equals the userName."""
        managed = [u for u in self._scim_users() if u.get("externalId")]
        if not managed:
            return
        account = managed[a % len(managed)]
        alias = f"alias.{self.next()}@{DOMAINS[b % 2]}"
        self.sandbox.scim.edit_user_by_hand(account["id"], emails=[{"value": alias, "type": "work", "primary": True}])
        self._taint_user_of(account)

    def _hand_members(self, a: int, b: int) -> list[str]:
        users = self._scim_users()
        return sorted({users[i % len(users)]["id"] for i in (a, b)}) if users and b % 3 != 2 else []

    def hand_make_group(self, a: int, b: int) -> None:
        """A group made in Atlassian with the name of an Entra group (adopted when that group is synced)."""
        taken = {g["displayName"].casefold() for g in self._scim_groups()}
        entra_names = [g["displayName"] for g in self.tenant.groups.values()] + self.retired_group_names()
        claimable = [n for n in entra_names if n.casefold() not in taken]
        if not claimable:
            return self.hand_make_team(a, b)
        members = self._hand_members(a, b)
        name = claimable[a % len(claimable)]
        group = self.sandbox.scim.add_group(name.upper() if b % 4 == 1 else name, members)
        self._taint_group_of(group)

    def hand_make_team(self, a: int, b: int) -> None:
        """A group of Atlassian's own (no Entra group has its name): guardsync never touches it."""
        members = self._hand_members(a, b)
        group = self.sandbox.scim.add_group(f"Hand Team {self.next()}", members)
        self.ledger.foreign_groups[group["id"]] = (group["displayName"], set(members))

    def hand_delete_group(self, a: int, b: int) -> None:
        groups = self._scim_groups()
        if not groups:
            return
        group = groups[a % len(groups)]
        self.sandbox.scim.delete_by_hand("Group", group["id"])
        self.ledger.foreign_groups.pop(group["id"], None)
        self.ledger.hand_grants.pop(("scim", group["id"]), None)
        if group.get("externalId"):
            self.ledger.hand_grants.pop(("entra", group["externalId"]), None)
        self._taint_group_of(group)

    def hand_grant(self, a: int, b: int) -> None:
        """A product granted to a group in Atlassian administration (one the group lacks, and that was not
        revoked by hand since the last run: guardsync could not tell that grant from its own)."""
        groups = self._scim_groups()
        if not groups:
            return
        group = groups[a % len(groups)]
        held = self.sandbox.org.held().get(group["id"], set())
        options = [w for w in HAND_WORKSPACES if w not in held and (group["id"], w) not in self.revoked_since_run]
        if not options:
            return
        workspace = options[b % len(options)]
        self.sandbox.org.grant_by_hand(group["displayName"], workspace)
        key = ("entra", group["externalId"]) if group.get("externalId") else ("scim", group["id"])
        self.ledger.hand_grants.setdefault(key, set()).add(workspace)

    def hand_revoke(self, a: int, b: int) -> None:
        held = self.sandbox.org.held()
        groups = [g for g in self._scim_groups() if held.get(g["id"])]
        if not groups:
            return
        group = groups[a % len(groups)]
        sid = group["id"]
        workspace = sorted(held[sid])[b % len(held[sid])]
        self.sandbox.org.revoke_by_hand(group["displayName"], workspace)
        self.revoked_since_run.add((sid, workspace))
        for key in (("scim", sid), ("entra", group.get("externalId"))):
            self.ledger.hand_grants.get(key, set()).discard(workspace)

    # -- configuration --------------------------------------------------------------------------------------
    def configure(self, kind: str, a: int, b: int) -> None:
        self.dirty = True
        getattr(self, f"configure_{kind}")(a, b)

    def configure_products(self, a: int, b: int) -> None:
        """[access.groups]: a synced group gets a set of products (none: the key goes)."""
        synced = self.pilot or self.groups()
        gid = synced[a % len(synced)]
        products = [p for bit, p in enumerate(PRODUCTS) if b & (1 << bit)]
        if products:
            self.access[gid] = products
        else:
            self.access.pop(gid, None)

    def configure_pilot(self, a: int, b: int) -> None:
        """[sync] groups: all groups, or one or two of them."""
        groups = self.groups()
        choice = a % 4
        self.pilot = [] if choice == 0 else sorted({groups[b % len(groups)], groups[(b + choice - 1) % len(groups)]})
        self._prune_access()

    def configure_domains(self, a: int, b: int) -> None:
        self.domains = [[], [DOMAINS[0]], [DOMAINS[1]], list(DOMAINS)][a % 4]

    def _prune_access(self) -> None:
        if self.pilot:
            self.access = {gid: products for gid, products in self.access.items() if gid in self.pilot}

    # -- runs ---------------------------------------------------------------------------------------------
    def settings(self):
        return parse_settings(self.config(), source="model")

    def _flow_run(self, flow=None, **options):
        self.sandbox.scim.reset_counts()
        self.sandbox.org.reset_counts()
        started = time.monotonic()
        try:
            return run_sync(self.settings(), flow=flow, **options)
        finally:
            self.runs += 1
            self.run_seconds += time.monotonic() - started

    def writes(self) -> int:
        return sum(self.sandbox.scim.total(m) for m in SCIM_WRITES) + self.sandbox.org.writes()

    def _before(self) -> tuple[set[str], set[str]]:
        return {u["id"] for u in self._scim_users()}, {g["id"] for g in self._scim_groups()}

    def run_kind(self, kind: str, k: int = 1) -> None:
        """One of RUNS; `k`: the write a kill follows (1-4), or the faults a Prefect retry meets (a bit mask)."""
        if kind.startswith("dry-run"):
            self.dry_run_then_sync(full=kind.endswith("--full"))
        elif kind.startswith("kill"):
            self.killed_run(1 + (k - 1) % 4, full=kind.endswith("--full"))
        elif kind == "retry":
            self.retried_run(k)
        else:
            self.run(full=kind == "full")

    def run(self, full: bool = False) -> None:
        before = self._before()
        status, outcome = self._flow_run(full=full)
        self._after_run(status, outcome, before, full)

    def dry_run_then_sync(self, full: bool = False) -> None:
        before = self._before()
        state_before = _digest(self.state_file)
        status, preview = self._flow_run(dry_run=True, full=full)
        problems = []
        if self.writes():
            problems.append(f"dry-run-writes-nothing: the dry run made {self.writes()} writes to Atlassian")
        if _digest(self.state_file) != state_before:
            problems.append("dry-run-writes-nothing: the dry run changed the state store")
        status_sync, summary = self._flow_run(full=full)
        if status == 0 and status_sync == 0:
            problems += same_counts(preview.counts, summary.counts)
        elif status != status_sync:
            problems.append(f"dry-run-counts-equal-sync: the dry run ended {status} ({_said(preview)}), the sync "
                            f"{status_sync} ({_said(summary)})")
        self._after_run(status_sync, summary, before, full, problems)

    def killed_run(self, k: int, full: bool = False) -> None:
        """The process dies right after Atlassian applied its K-th write; then the same command runs again."""
        before = self._before()
        with killed_after(k):
            try:
                self._flow_run(full=full)
            except Killed:
                self.kills += 1
        status, outcome = self._flow_run(full=full)
        self._after_run(status, outcome, before, full)

    def retried_run(self, which: int) -> None:
        """Load tasks fail on a non-transient answer (401) to their first write of some kinds; Prefect retries the
        flow run, which re-runs only what failed (its earlier stages' results are cached)."""
        from flows.sync_directory import sync_directory

        chosen = [RETRY_FAULTS[i] for i in range(len(RETRY_FAULTS)) if which >> i & 1] or [RETRY_FAULTS[0]]
        faults = [(self.sandbox.scim if server == "scim" else self.sandbox.org,
                   Fault(f.method, f.path_re, f.status, times=1, body=FAULT_BODY)) for server, f in chosen]
        for server, fault in faults:
            server.inject(fault)
        before = self._before()
        try:
            flow = sync_directory.with_options(retries=len(faults), retry_delay_seconds=0)
            status, outcome = self._flow_run(flow=flow)
        finally:
            for server, _ in faults:
                server.clear_faults()
        self.retries += sum(fault.times == 0 for _, fault in faults)
        self._after_run(status, outcome, before, full=False)

    def _after_run(self, status: int, outcome, before, full: bool, problems: list[str] | None = None) -> None:
        """The oracle's verdict on a completed run; then the same run again writes nothing."""
        problems = list(problems or [])
        expected = self.expected()
        if status == 3 and getattr(outcome, "rule", None) == "empty_scope" and not expected.enabled():
            if self.writes():
                problems.append(f"run-status: blocked (empty scope), but {self.writes()} writes were made")
            self._raise(problems)
            return
        if status != 0:
            problems.append(f"run-status: the run ended {status}, want 0: {_said(outcome)}")
            self._raise(problems)
        atlassian = Atlassian.read(self.sandbox)
        self.ledger.rekey_adopted(atlassian, expected)
        users_view, groups_view = expected.view()
        observing = full or self.last_view is None
        touched_users, touched_groups = self._touched(users_view, groups_view)
        scope = Scope() if observing else Scope(frozenset(self.tainted_users - touched_users),
                                               frozenset(self.tainted_groups - touched_groups), tolerate_dangling=True)
        problems += check(expected, atlassian, self.ledger, scope, atlassian.users.keys() - before[0],
                          atlassian.groups.keys() - before[1])
        self._raise(problems)
        again, outcome = self._flow_run(full=full)
        if again != 0 or self.writes():
            self._raise([f"second-run-writes-nothing: the same run again ended {again} with {self.writes()} writes "
                         f"({dict(self.sandbox.scim.requests)}, {dict(self.sandbox.org.requests)}): {_said(outcome)}"])
        # Completed: this is what guardsync has now brought about.
        if observing:
            self.tainted_users.clear()
            self.tainted_groups.clear()
        else:
            self.tainted_users -= touched_users
            self.tainted_groups -= touched_groups
        self.last_view = (users_view, groups_view)
        self.dirty = False
        self.revoked_since_run.clear()
        self.ledger.forget_gone(Atlassian.read(self.sandbox))

    def _touched(self, users_view: dict, groups_view: dict) -> tuple[set[str], set[str]]:
        """Objects whose wanted state changed since the last completed run (in Entra or in the settings)."""
        old_users, old_groups = self.last_view or ({}, {})
        users = {uid for uid in set(users_view) | set(old_users) if users_view.get(uid) != old_users.get(uid)}
        groups = {gid for gid in set(groups_view) | set(old_groups) if groups_view.get(gid) != old_groups.get(gid)}
        return users, groups

    @staticmethod
    def _raise(problems: list[str]) -> None:
        if problems:
            raise Violation("\n".join(problems))

    # -- brownfield ---------------------------------------------------------------------------------------
    def _populate(self) -> None:
        """Atlassian before the first run: accounts of some Entra users (one in other letter case, one inactive,
        one of a disabled user), a stranger's account, a group of an Entra group's name, a team of its own."""
        users = [self.tenant.users[uid] for uid in self.users() if self.tenant.users[uid]["userPrincipalName"].rpartition("@")[2] in DOMAINS]
        for n, user in enumerate(users[:4]):
            upn = user["userPrincipalName"]
            account = self.sandbox.scim.add_user(_scim_user(upn.upper() if n == 1 else upn, active=n != 2))
            self._taint_user_of(account)
        stranger = self.sandbox.scim.add_user(_scim_user(f"hand.{self.next()}@{DOMAINS[0]}", active=True))
        self.ledger.foreign_users[stranger["id"]] = stranger
        group = self.sandbox.scim.add_group(self.tenant.groups[self.groups()[0]]["displayName"].upper(), [stranger["id"]])
        self._taint_group_of(group)
        own = self.sandbox.scim.add_group(f"Hand Team {self.next()}", [stranger["id"]])
        self.ledger.foreign_groups[own["id"]] = (own["displayName"], {stranger["id"]})


def _scim_user(user_name: str, active: bool) -> dict:
    return {"userName": user_name, "emails": [{"value": user_name, "type": "work", "primary": True}],
            "active": active, "displayName": user_name.split("@")[0]}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _said(outcome) -> str:
    """A run's outcome in one line: its message, or its failures."""
    if outcome is None:
        return ""
    failures = getattr(outcome, "failures", None)
    return "; ".join(failures[:3]) if failures else str(getattr(outcome, "message", outcome))[:500]


class killed_after:
    """Within it, the SCIM and Organizations API clients raise Killed right after their K-th applied write."""

    def __init__(self, k: int):
        self.k, self.count, self.stack = k, 0, ExitStack()

    def __enter__(self):
        from guardsync.admin import AdminClient
        from guardsync.scim import ScimClient

        for client, is_write in ((ScimClient, lambda method, path: method != "GET"),
                                 (AdminClient, lambda method, path: path.endswith(("/assign", "/revoke")))):
            self.stack.enter_context(mock.patch.object(client, "_call", self._wrap(client._call, is_write)))
        return self

    def _wrap(self, call, is_write):
        outer = self

        def counted(client, method, path, **kwargs):
            answer = call(client, method, path, **kwargs)
            if is_write(method, path):
                outer.count += 1
                if outer.count == outer.k:
                    raise Killed(f"killed after write {outer.k}")
            return answer

        return counted

    def __exit__(self, *exc):
        self.stack.close()
        return False


# == the state machine ======================================================================================

# Kinds repeat to weigh them: renames and grants are where the contract is subtle.
ENTRA = ("add_user", "rename_user", "rename_user_to_old_name", "retitle_user", "toggle_user", "toggle_user",
         "delete_user", "handover", "add_group", "rename_group", "rename_group_to_old_name", "recase_group",
         "delete_group", "recreate_group", "recreate_group", "add_member", "remove_member", "nest")
HAND = ("make_account", "make_stranger", "delete_account", "edit_email", "make_group", "make_team", "delete_group",
        "grant", "grant", "revoke", "revoke")
CONFIGURE = ("products", "pilot", "domains")
RUNS = ("delta", "full", "dry-run then sync", "dry-run then sync --full", "kill", "kill --full", "retry")
pick = st.integers(0, 15)  # picks among what exists (modulo): small numbers make the same objects meet
STATS = {"histories": 0, "steps": 0, "runs": 0, "run_seconds": 0.0, "kills": 0, "retries": 0}


class GuardsyncModel(RuleBasedStateMachine):
    """One rule, a round: what happens between two runs (Entra changes, hand edits in Atlassian, a configuration
    change, each possibly none), then a run of some kind. A history hypothesis prints replays as written, e.g.

        state = GuardsyncModel()
        state.start(seed=0, users=8, groups=3, brownfield=False)
        state.round(entra=[("rename_group", 0, 1)], hand=[("grant", 0, 0)], configure=[], run="delta", k=1)
        state.teardown()

    At the end of a history that broke nothing, a full read must bring everything in line: whatever was left
    to it (hand edits since the last full read) is checked then.
    """

    world: World | None = None
    broken = False

    @initialize(seed=st.integers(0, 2**16), users=st.integers(8, 12), groups=st.integers(3, 5), brownfield=st.booleans())
    def start(self, seed, users, groups, brownfield):
        self.world = World(seed, users, groups, brownfield)
        STATS["histories"] += 1

    @rule(entra=st.lists(st.tuples(st.sampled_from(ENTRA), pick, pick), max_size=3),
          hand=st.lists(st.tuples(st.sampled_from(HAND), pick, pick), max_size=2),
          configure=st.lists(st.tuples(st.sampled_from(CONFIGURE), pick, pick), max_size=1),
          run=st.sampled_from(RUNS), k=st.integers(1, 2 ** len(RETRY_FAULTS) - 1))
    def round(self, entra, hand, configure, run, k):
        STATS["steps"] += 1
        try:
            for kind, a, b in entra:
                self.world.entra(kind, a, b)
            for kind, a, b in hand:
                self.world.hand(kind, a, b)
            for kind, a, b in configure:
                self.world.configure(kind, a, b)
            self.world.run_kind(run, k)
        except BaseException:
            self.broken = True
            raise

    def teardown(self):
        if self.world is None:
            return
        try:
            if not self.broken and not self.world.settled():
                self.world.run(full=True)
        finally:
            STATS["runs"] += self.world.runs
            STATS["run_seconds"] += self.world.run_seconds
            STATS["kills"] += self.world.kills
            STATS["retries"] += self.world.retries
            self.world.close()


def model_settings(examples: int = EXAMPLES, steps: int = STEPS, deep: bool = DEEP) -> settings:
    """CI: the same histories every time, no example database, no shrinking (a failure prints its whole
    history, which replays as it is). Deep: fresh histories each time, shrunk to a short one on failure."""
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if deep else (Phase.explicit, Phase.generate)
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                    derandomize=not deep, phases=phases, suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=False, print_blob=deep)


@pytest.mark.slow
@pytest.mark.timeout(120 + 60 * EXAMPLES * STEPS)  # a hung run fails the test (the budget is histories, not time)
def test_random_histories_keep_atlassian_as_the_contract_says(prefect_server, record_property):
    started = time.monotonic()
    STATS.update(histories=0, steps=0, runs=0, run_seconds=0.0, kills=0, retries=0)
    try:
        run_state_machine_as_test(GuardsyncModel, settings=model_settings())
    finally:
        runs = STATS["runs"] or 1
        record_property("measured", f"{STATS['histories']} histories, {STATS['steps']} rounds, {STATS['runs']} runs "
                        f"({STATS['run_seconds'] / runs:.1f} s a run; {STATS['kills']} killed and {STATS['retries']} "
                        f"retried by Prefect) in {time.monotonic() - started:.0f} s"
                        f"{' (deep)' if DEEP else ''}")
