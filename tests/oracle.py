"""The model test's oracle: what Atlassian must hold after a run, from DESIGN.md alone.

It reads Entra's truth (the sandbox's Tenant object), the settings (the configuration dict as the TOML
holds it) and Atlassian's truth (the SCIM server's and the Organizations API emulator's own records),
and imports nothing of guardsync's planner, loader or scope: a second implementation of the contract,
small enough to read, so the two can disagree.

What it cannot read from either system is what happened by hand in Atlassian; the model test keeps that
in a Ledger (hand-made accounts, groups and grants) and passes it in.

Each violation names its invariant first ("invariant-name: what is wrong"), so a report can say which
rule of the contract a history broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")  # "looks like an address"
ENABLED, DISABLED, EXCLUDED = "enabled", "disabled", "excluded"  # in scope and enabled / in scope, disabled / not in scope


# == what Entra and the settings say Atlassian must hold ================================================


@dataclass(frozen=True)
class Account:
    """An in-scope user's account, as DESIGN "Users in Atlassian" spells it (absent values: None)."""

    user_name: str
    display_name: str | None
    given_name: str | None
    family_name: str | None
    title: str | None


@dataclass(frozen=True)
class Fate:
    state: str  # ENABLED | DISABLED | EXCLUDED
    account: Account | None  # None when excluded (the user's identifier is of no concern then)


@dataclass(frozen=True)
class SyncedGroup:
    name: str
    members: frozenset[str]  # Entra ids: transitive, in-scope, enabled users


@dataclass
class Expected:
    users: dict[str, Fate]  # every user of the tenant
    groups: dict[str, SyncedGroup]  # synced Entra group id -> name and members
    grants: dict[str, frozenset[str]]  # synced Entra group id -> workspace ids [access.groups] gives it

    def enabled(self) -> set[str]:
        return {uid for uid, fate in self.users.items() if fate.state == ENABLED}

    def view(self) -> tuple[dict, dict]:
        """What a run has to bring about for each object: compared between runs, it tells which objects changed
        (in Entra or through the settings) since the last completed run."""
        users = {uid: (fate.state, fate.account) for uid, fate in self.users.items()}
        groups = {gid: (group.name.casefold(), group.members, self.grants.get(gid, frozenset()))
                  for gid, group in self.groups.items()}
        return users, groups


class ModelError(Exception):
    """The generated world left what the model covers (a configuration error, a quarantined user)."""


def resolve_group(tenant, key: str) -> str:
    """A configured group: its object id, or its displayName in any letter case, naming exactly one group."""
    if key in tenant.groups:
        return key
    matches = [gid for gid, group in tenant.groups.items() if group["displayName"].casefold() == key.casefold()]
    if len(matches) != 1:
        raise ModelError(f"configured group {key!r} matches {len(matches)} groups: a configuration error")
    return matches[0]


def transitive_users(tenant, group_id: str) -> set[str]:
    """Users reached through nesting (cycles, devices, contacts and service principals handled)."""
    seen, users, stack = {group_id}, set(), [group_id]
    while stack:
        for member in tenant.members.get(stack.pop(), []):
            kind = tenant.type_of(member)
            if kind == "user":
                users.add(member)
            elif kind == "group" and member not in seen:
                seen.add(member)
                stack.append(member)
    return users


def allowed_domains(tenant, configured: list[str]) -> set[str]:
    if configured:
        verified = {d.casefold() for d in tenant.verified_domains}
        unknown = [d for d in configured if d.casefold() not in verified]
        if unknown:
            raise ModelError(f"configured domains not verified by the tenant: {unknown}")
        return {d.casefold() for d in configured}
    return {d["id"].casefold() for d in tenant.domains if d["isVerified"] and not d["isInitial"]}


def resolve_product(reference: str, workspaces) -> str:
    """`key` or `key@site-host` -> the one workspace id (DESIGN "Product access")."""
    key, _, host = reference.partition("@")
    matches = [w.id for w in workspaces if w.type_key == key and (not host or w.host.casefold() == host.casefold())]
    if len(matches) != 1:
        raise ModelError(f"product {reference!r} names {len(matches)} workspaces: a configuration error")
    return matches[0]


def expect(tenant, config: dict, workspaces) -> Expected:
    """DESIGN "Semantics" and "Product access", for the identifier `upn`."""
    sync = config["sync"]
    if sync.get("identifier", "upn") != "upn":
        raise ModelError("the model covers identifier = upn only")
    pilot = [resolve_group(tenant, key) for key in sync.get("groups", [])]
    domains = allowed_domains(tenant, sync.get("domains", []))
    synced = pilot or list(tenant.groups)
    candidates = set().union(*(transitive_users(tenant, gid) for gid in pilot)) if pilot else set(tenant.users)

    users: dict[str, Fate] = {}
    identifiers: dict[str, list[str]] = {}
    for uid, user in tenant.users.items():
        upn = user["userPrincipalName"] or ""
        in_scope = (uid in candidates and "#EXT#" not in upn and ADDRESS.match(upn) is not None
                    and upn.rpartition("@")[2].casefold() in domains)
        if not in_scope:
            users[uid] = Fate(EXCLUDED, None)
            continue
        identifiers.setdefault(upn.casefold(), []).append(uid)
        account = Account(upn, user["displayName"] or None, user["givenName"] or None, user["surname"] or None,
                          user["jobTitle"] or None)
        users[uid] = Fate(ENABLED if user["accountEnabled"] else DISABLED, account)
    shared = {key: ids for key, ids in identifiers.items() if len(ids) > 1}
    if shared:
        raise ModelError(f"users sharing an identifier would be quarantined: {shared}")

    enabled = {uid for uid, fate in users.items() if fate.state == ENABLED}
    groups = {gid: SyncedGroup(tenant.groups[gid]["displayName"], frozenset(transitive_users(tenant, gid) & enabled))
              for gid in synced}
    grants: dict[str, set[str]] = {}
    for key, products in (config.get("access") or {}).get("groups", {}).items():
        gid = resolve_group(tenant, key)
        if gid not in groups:
            raise ModelError(f"[access.groups] {key!r} names no synced group: a configuration error")
        grants.setdefault(gid, set()).update(resolve_product(p, workspaces) for p in products)
    return Expected(users, groups, {gid: frozenset(w) for gid, w in grants.items() if w})


# == what Atlassian holds ==================================================================================


@dataclass
class Atlassian:
    """The emulators' own records, read without going through guardsync."""

    users: dict[str, dict]  # SCIM id -> SCIM JSON
    groups: dict[str, dict]  # SCIM id -> SCIM JSON (members' values)
    held: dict[str, set[str]]  # SCIM group id -> workspace ids it holds with the user role

    @classmethod
    def read(cls, sandbox) -> "Atlassian":
        return cls({u["id"]: u for u in sandbox.scim.users()}, {g["id"]: g for g in sandbox.scim.groups()},
                   sandbox.org.held())

    def accounts_of(self, entra_id: str) -> list[dict]:
        return [u for u in self.users.values() if u.get("externalId") == entra_id]

    def groups_of(self, entra_id: str) -> list[dict]:
        return [g for g in self.groups.values() if g.get("externalId") == entra_id]

    def group_named(self, name: str) -> dict | None:
        return next((g for g in self.groups.values() if g["displayName"].casefold() == name.casefold()), None)

    def user_named(self, user_name: str) -> dict | None:
        return next((u for u in self.users.values() if u["userName"].casefold() == user_name.casefold()), None)

    @staticmethod
    def members(group: dict) -> set[str]:
        return {m["value"] for m in group.get("members") or []}


# == what was done by hand (the model's record) ==========================================================


HandKey = tuple[str, str]  # ("entra", Entra group id) for a group guardsync manages, ("scim", SCIM id) otherwise


@dataclass
class Ledger:
    """What happened by hand in Atlassian, which neither system tells apart from guardsync's own writes."""

    foreign_users: dict[str, dict] = field(default_factory=dict)  # SCIM id -> the account as made by hand
    foreign_groups: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # SCIM id -> (name, member SCIM ids)
    hand_grants: dict[HandKey, set[str]] = field(default_factory=dict)  # -> workspace ids granted by hand
    deleted_by_hand: set[str] = field(default_factory=set)  # SCIM ids of accounts an admin deleted
    entra_users_ever: set[str] = field(default_factory=set)  # every Entra user id the tenant ever had

    def hand(self, key: HandKey) -> set[str]:
        return self.hand_grants.get(key, set())

    def rekey_adopted(self, atlassian: Atlassian, expected: Expected) -> None:
        """A hand-made group adopted for a synced group (it carries that group's id now): its hand grants are
        that group's from here on, and follow it through renames."""
        for key in [k for k in self.hand_grants if k[0] == "scim"]:
            group = atlassian.groups.get(key[1])
            if group is not None and group.get("externalId") in expected.groups:
                moved = self.hand_grants.pop(key)
                self.hand_grants.setdefault(("entra", group["externalId"]), set()).update(moved)

    def forget_gone(self, atlassian: Atlassian) -> None:
        """Hand grants of groups that no longer exist (deleted with their group, as DESIGN says) are history."""
        alive_entra = {g.get("externalId") for g in atlassian.groups.values()}
        for key in list(self.hand_grants):
            if (key[0] == "scim" and key[1] not in atlassian.groups) or (key[0] == "entra" and key[1] not in alive_entra):
                del self.hand_grants[key]


# == the invariants ========================================================================================


@dataclass
class Scope:
    """Which objects a check covers. A delta run plans from the record and meets hand edits only when it writes
    (DESIGN "Atlassian as it is"): objects edited by hand since the last full read and unchanged in Entra since
    the last completed run are left to the next full read. Everything else is checked after every run."""

    skip_users: frozenset[str] = frozenset()  # Entra user ids
    skip_groups: frozenset[str] = frozenset()  # Entra group ids
    tolerate_dangling: bool = False  # members pointing at accounts deleted by hand (a delta run cannot know)


def check(expected: Expected, atlassian: Atlassian, ledger: Ledger, scope: Scope = Scope(),
          created_users: Iterable[str] = (), created_groups: Iterable[str] = ()) -> list[str]:
    """Every violation of the contract found in Atlassian after a completed run. `created_*`: SCIM ids that
    appeared during the run."""
    out: list[str] = []
    out += _accounts(expected, atlassian, ledger, scope)
    out += _created(expected, atlassian, created_users, created_groups)
    out += _groups(expected, atlassian, ledger, scope)
    out += _hand_made(atlassian, ledger)
    out += _grants(expected, atlassian, ledger, scope)
    return out


def _accounts(expected: Expected, atlassian: Atlassian, ledger: Ledger, scope: Scope) -> list[str]:
    out = []
    for uid, fate in expected.users.items():
        if uid in scope.skip_users:
            continue
        active = [a for a in atlassian.accounts_of(uid) if a.get("active")]
        if fate.state == ENABLED:
            if len(active) != 1:
                out.append(f"account-of-enabled-user: {fate.account.user_name} [{uid}] has {len(active)} active "
                           f"accounts carrying its id (want 1): {[a['userName'] for a in active]}")
                continue
            out += _account_differs(active[0], fate.account, uid)
        else:
            if active:
                out.append(f"no-active-account-for-leaver: {active[0]['userName']} [{uid}] is "
                           f"{'disabled' if fate.state == DISABLED else 'out of scope'} in Entra but its account is active")
        if fate.state == DISABLED:  # an account of the same name is adopted and deactivated, never left active
            named = atlassian.user_named(fate.account.user_name)
            if named is not None and named.get("active") and named.get("externalId") != uid:
                out.append(f"no-active-account-for-leaver: {named['userName']} is active, and its name is the identifier "
                           f"of {uid}, disabled in Entra and in scope (adopt and deactivate)")
    for uid in sorted(ledger.entra_users_ever - set(expected.users) - scope.skip_users):  # deleted in Entra
        active = [a for a in atlassian.accounts_of(uid) if a.get("active")]
        if active:
            out.append(f"no-active-account-for-leaver: {active[0]['userName']} [{uid}] was deleted in Entra but its "
                       "account is active")
    return out


def _account_differs(account: dict, want: Account, uid: str) -> list[str]:
    got = Account(account["userName"], account.get("displayName"), (account.get("name") or {}).get("givenName"),
                  (account.get("name") or {}).get("familyName"), account.get("title"))
    out = []
    if got != want:
        fields = [f"{name} {getattr(got, name)!r} (want {getattr(want, name)!r})"
                  for name in Account.__dataclass_fields__ if getattr(got, name) != getattr(want, name)]
        out.append(f"account-of-enabled-user: {want.user_name} [{uid}]: " + ", ".join(fields))
    primary = [e.get("value") for e in account.get("emails") or [] if e.get("primary")]
    if primary != [want.user_name]:
        out.append(f"account-of-enabled-user: {want.user_name} [{uid}]: primary email {primary} (want the identifier)")
    return out


def _created(expected: Expected, atlassian: Atlassian, created_users: Iterable[str], created_groups: Iterable[str]) -> list[str]:
    """No POST for a leaver, nor for anything guardsync does not sync (DESIGN "Atlassian as it is")."""
    enabled = expected.enabled()
    out = []
    for scim_id in created_users:
        account = atlassian.users.get(scim_id)
        if account is not None and account.get("externalId") not in enabled:
            out.append(f"no-account-created-for-leaver: {account['userName']} was created this run for "
                       f"{account.get('externalId')!r}, which is not an enabled in-scope user")
    for scim_id in created_groups:
        group = atlassian.groups.get(scim_id)
        if group is not None and group.get("externalId") not in expected.groups:
            out.append(f"no-group-created-for-unsynced: {group['displayName']} was created this run for "
                       f"{group.get('externalId')!r}, which is not a synced group")
    return out


def _groups(expected: Expected, atlassian: Atlassian, ledger: Ledger, scope: Scope) -> list[str]:
    out = []
    entra_of = {sid: a.get("externalId") for sid, a in atlassian.users.items()}
    for gid, want in expected.groups.items():
        if gid in scope.skip_groups:
            continue
        found = atlassian.groups_of(gid)
        if len(found) != 1 or found[0]["displayName"].casefold() != want.name.casefold():
            out.append(f"synced-group-exact: {want.name} [{gid}] is held by {[g['displayName'] for g in found]} in "
                       "Atlassian (want exactly one group of that name)")
            continue
        values = Atlassian.members(found[0])
        dangling = {v for v in values if v not in atlassian.users}
        tolerated = dangling & ledger.deleted_by_hand if scope.tolerate_dangling else set()
        got = {entra_of[v] if v in atlassian.users else f"(no user {v})" for v in values - tolerated}
        got -= scope.skip_users
        wanted = set(want.members) - scope.skip_users
        if got != wanted:
            out.append(f"synced-group-exact: {want.name} [{gid}] members: missing {sorted(wanted - got)}, "
                       f"extra {sorted(map(str, got - wanted))}")
    for group in atlassian.groups.values():
        gid = group.get("externalId")
        if gid and gid not in expected.groups and gid not in scope.skip_groups:
            out.append(f"no-stale-group: {group['displayName']} still carries {gid}, which is not a synced group "
                       "(deleted, renamed away or out of scope)")
    return out


def _hand_made(atlassian: Atlassian, ledger: Ledger) -> list[str]:
    """DESIGN "Adoption": objects guardsync did not create and does not match are never touched."""
    out = []
    for scim_id, made in ledger.foreign_users.items():
        now = atlassian.users.get(scim_id)
        if now != made:
            out.append(f"hand-made-account-untouched: {made['userName']} was "
                       f"{'deleted' if now is None else 'changed: ' + str(_differences(made, now))}")
    for scim_id, (name, members) in ledger.foreign_groups.items():
        now = atlassian.groups.get(scim_id)
        if now is None:
            out.append(f"hand-made-group-untouched: {name} was deleted")
        elif (now["displayName"], now.get("externalId"), Atlassian.members(now)) != (name, None, members - ledger.deleted_by_hand):
            out.append(f"hand-made-group-untouched: {name} was changed: name {now['displayName']!r}, externalId "
                       f"{now.get('externalId')!r}, members {sorted(Atlassian.members(now))} (want {sorted(members)})")
    return out


def _differences(before: dict, after: dict) -> dict:
    return {key: (before.get(key), after.get(key)) for key in set(before) | set(after) if before.get(key) != after.get(key)}


def _grants(expected: Expected, atlassian: Atlassian, ledger: Ledger, scope: Scope) -> list[str]:
    """DESIGN "Product access": configured grants present, guardsync's no-longer-configured ones revoked, a grant
    made by hand never revoked (it follows its group through renames), nothing on groups guardsync does not manage."""
    out = []
    for gid, want in expected.groups.items():
        found = atlassian.groups_of(gid)
        if gid in scope.skip_groups or len(found) != 1:
            continue  # a missing group is reported by synced-group-exact
        held = atlassian.held.get(found[0]["id"], set())
        configured, hand = expected.grants.get(gid, frozenset()), ledger.hand(("entra", gid))
        if configured - held:
            out.append(f"configured-grants-present: {want.name} [{gid}] lacks {sorted(configured - held)}")
        if hand - held:
            out.append(f"hand-made-grant-kept: {want.name} [{gid}] lost {sorted(hand - held)}, granted by hand")
        if held - configured - hand:
            out.append(f"only-configured-or-hand-grants: {want.name} [{gid}] holds {sorted(held - configured - hand)}, "
                       "neither configured nor granted by hand (a grant of guardsync's no longer configured stays)")
    for key, hand in ledger.hand_grants.items():
        if key[0] != "scim":
            continue
        group = atlassian.groups.get(key[1])
        if group is None:
            continue  # a foreign group's deletion is reported by hand-made-group-untouched
        held = atlassian.held.get(key[1], set())
        if hand - held:
            out.append(f"hand-made-grant-kept: {group['displayName']} (made by hand) lost {sorted(hand - held)}")
    for scim_id in ledger.foreign_groups:
        held = atlassian.held.get(scim_id, set())
        extra = held - ledger.hand(("scim", scim_id))
        if scim_id in atlassian.groups and extra:
            out.append(f"only-configured-or-hand-grants: {atlassian.groups[scim_id]['displayName']} (made by hand) "
                       f"was granted {sorted(extra)}")
    return out


# == runs ==================================================================================================


def nonzero(counts: dict) -> dict:
    return {key: value for key, value in counts.items() if value}


def same_counts(preview: dict, summary: dict) -> list[str]:
    """DESIGN "Atlassian as it is": the dry run's counts are the counts the sync then reports."""
    if nonzero(preview) == nonzero(summary):
        return []
    keys = sorted(set(nonzero(preview)) | set(nonzero(summary)))
    return ["dry-run-counts-equal-sync: " + ", ".join(f"{k} {preview.get(k, 0)} vs {summary.get(k, 0)}" for k in keys
                                                      if preview.get(k, 0) != summary.get(k, 0))]
