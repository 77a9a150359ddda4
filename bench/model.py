"""What a sync of a sandbox tenant should do, worked out from the tenant alone (no guardsync code).

The benchmark compares what guardsync did with this: the desired Atlassian state
(users and flattened groups, per DESIGN.md), the fewest requests a run needs to
read the tenant and to write the difference, and the tenant churn between runs.

Written for the tenants `generate_tenant(..., bad_records=False)` makes: every user
is a member on an allowed domain with a unique UPN, so the contract's scope rules
reduce to "every user; members are the enabled users reached through nesting".
Tenants with bad records (guests, case twins, unverified domains) are out of scope.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from guardsync.sandbox.tenant import Tenant

GRAPH_PAGE = 999  # $top maximum of /users, /groups, /groups/{id}/members
DELTA_PAGE_OBJECTS, DELTA_PAGE_LINKS = 200, 500  # caps of a users/groups delta page (odata.maxpagesize)
SCIM_MEMBER_CHANGES_PER_PATCH = 100
GRAPH_FIXED = {  # requests any run makes once, whatever the tenant size
    "GET /{tenant}/v2.0/.well-known/openid-configuration": 1,  # msal's authority metadata
    "POST /{tenant}/oauth2/v2.0/token": 1,
    "GET /v1.0/organization": 1,
    "GET /v1.0/domains": 1,
}

# (userName, displayName, givenName, familyName, title, active, then the rest of Atlassian's own Entra sync
# (the default [attributes]): preferredLanguage, work phone (the first businessPhones), mobile phone, department)
UserRecord = tuple
ACTIVE = 5  # where `active` is in a UserRecord
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z]{4})?(?:-(?:[A-Za-z]{2}|[0-9]{3}))?(?:-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*\Z")


@dataclass
class Desired:
    """What Atlassian should hold: users by Entra id, groups by Entra id -> (name, member ids)."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    groups: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)


@dataclass
class Applied:
    """What a correct guardsync has written so far (users stay once created, deactivated at worst)."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    groups: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)


def desired_state(tenant: Tenant) -> Desired:
    with tenant.lock:
        users = {uid: _record(u) for uid, u in tenant.users.items()}
        enabled = {uid for uid, record in users.items() if record[ACTIVE]}
        groups = {gid: (g["displayName"], frozenset(_transitive_users(tenant, gid) & enabled))
                  for gid, g in tenant.groups.items()}
    return Desired(users, groups)


def _record(u: dict) -> UserRecord:
    """What Atlassian should hold of a user: empty values are not sent, nor a language that is no tag."""
    language = u.get("preferredLanguage") or ""
    return (u["userPrincipalName"], u.get("displayName") or "", u.get("givenName") or "", u.get("surname") or "",
            u.get("jobTitle") or "", u.get("accountEnabled") is True,
            language if LANGUAGE_TAG.search(language) else "", (u.get("businessPhones") or [""])[0] or "",
            u.get("mobilePhone") or "", u.get("department") or "")


def _transitive_users(tenant: Tenant, root: str) -> set[str]:
    seen, stack, found = {root}, [root], set()
    while stack:
        for member in tenant.members.get(stack.pop(), ()):
            if member in seen:
                continue
            seen.add(member)
            if member in tenant.users:
                found.add(member)
            elif member in tenant.groups:
                stack.append(member)
    return found


# -- the fewest requests -----------------------------------------------------------


def graph_minimum_full(tenant: Tenant) -> dict[str, int]:
    """The fewest requests that read the whole tenant and leave delta links for the next run.

    Users: /users at 999 a page then one `/users/delta?$deltatoken=latest`, or /users/delta
    at its cap of 200 a page, whichever is fewer. Groups and members: /groups at 999 and
    each group's /members at 999 (at least one each) then one groups/delta `latest`, or
    /groups/delta at its caps (200 groups and 500 member links a page), whichever is fewer.
    """
    with tenant.lock:
        users, groups = len(tenant.users), len(tenant.groups)
        sizes = [len(tenant.members.get(g, ())) for g in tenant.groups]
    plain_users = max(1, math.ceil(users / GRAPH_PAGE))
    delta_users = delta_pages(users, 0)
    minimum = dict(GRAPH_FIXED)
    if plain_users + 1 <= delta_users:
        minimum.update({"GET /v1.0/users": plain_users, "GET /v1.0/users/delta": 1})
    else:
        minimum["GET /v1.0/users/delta"] = delta_users
    plain_groups = max(1, math.ceil(groups / GRAPH_PAGE))
    plain_members = sum(max(1, math.ceil(n / GRAPH_PAGE)) for n in sizes)
    delta_groups = delta_pages(groups, sum(sizes))
    if plain_groups + plain_members + 1 <= delta_groups:
        minimum.update({"GET /v1.0/groups": plain_groups, "GET /v1.0/groups/{id}/members": plain_members,
                        "GET /v1.0/groups/delta": 1})
    else:
        minimum["GET /v1.0/groups/delta"] = delta_groups
    return minimum


def delta_pages(objects: int, links: int) -> int:
    """Pages of a delta round: at most 200 objects and 500 member links a page (Graph's caps)."""
    return max(1, math.ceil(objects / DELTA_PAGE_OBJECTS), math.ceil(links / DELTA_PAGE_LINKS))


def graph_minimum_delta(changes: dict[str, int]) -> dict[str, int]:
    """A delta round from the last run's delta links: pages of what changed only."""
    return {
        **GRAPH_FIXED,
        "GET /v1.0/users/delta": delta_pages(changes["users"], 0),
        "GET /v1.0/groups/delta": delta_pages(changes["groups"], changes["links"]),
    }


@dataclass
class Writes:
    """The SCIM writes that take Atlassian from `applied` to `desired`, by kind and by endpoint."""

    users_created: int = 0
    users_updated: int = 0  # attribute changes, reactivations
    users_deactivated: int = 0  # disabled, or deleted in Entra
    groups_created: int = 0
    groups_deleted: int = 0
    members_added: int = 0
    members_removed: int = 0
    member_patches: int = 0
    users_adopted: int = 0  # accounts that existed (brownfield): one PUT each, externalId and stale attributes
    groups_adopted: int = 0  # groups that existed: one PATCH each for the externalId
    user_pages: int = 0  # the observation of Atlassian (first runs): GET /Users pages of 100
    group_pages: int = 0
    users_changed_ids: set[str] = field(default_factory=set, repr=False)
    groups_changed_ids: set[str] = field(default_factory=set, repr=False)

    def by_endpoint(self) -> dict[str, int]:
        return {
            "POST /Users": self.users_created,
            "PUT /Users/{id}": self.users_updated + self.users_deactivated + self.users_adopted,
            "POST /Groups": self.groups_created,
            "DELETE /Groups/{id}": self.groups_deleted,
            "PATCH /Groups/{id}": self.member_patches + self.groups_adopted,
            "GET /Users": self.user_pages,
            "GET /Groups": self.group_pages,
        }

    def total(self) -> int:
        return sum(self.by_endpoint().values())

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


SCIM_PAGE = 100  # Atlassian lists at most 100 users or groups a page


def list_pages(count: int) -> int:
    return max(1, math.ceil(count / SCIM_PAGE))


def scim_minimum(applied: Applied, desired: Desired, existing: Applied | None = None) -> tuple[Writes, Applied]:
    """The requests a run needs, and the state they leave (the next run's `applied`).

    `existing`: on a first run, what Atlassian already holds that guardsync did not create
    (brownfield), by Entra id: the run lists it (pages of 100), then adopts each account with
    one PUT (it lacks the externalId) and each group with one PATCH, members patched where they differ.
    """
    w = Writes()
    users = dict(applied.users)
    if existing is not None:
        w.user_pages, w.group_pages = list_pages(len(existing.users)), list_pages(len(existing.groups))
    existing = existing or Applied()
    for uid, record in desired.users.items():
        before = applied.users.get(uid)
        if before is None and uid in existing.users:
            w.users_adopted += 1
            users[uid] = record
            w.users_changed_ids.add(uid)
        elif before is None:
            if record[ACTIVE]:  # a disabled user who never reached Atlassian is not created
                w.users_created += 1
                users[uid] = record
                w.users_changed_ids.add(uid)
        elif before != record:
            if before[ACTIVE] and not record[ACTIVE]:
                w.users_deactivated += 1
            else:
                w.users_updated += 1
            users[uid] = record
            w.users_changed_ids.add(uid)
    for uid, before in applied.users.items():
        if uid not in desired.users and before[ACTIVE]:  # deleted in Entra: deactivated, never deleted
            w.users_deactivated += 1
            users[uid] = before[:ACTIVE] + (False,) + before[ACTIVE + 1:]
            w.users_changed_ids.add(uid)
    groups = {}
    for gid, (name, members) in desired.groups.items():
        before = applied.groups.get(gid)
        current = before[1] if before is not None and before[0].casefold() == name.casefold() else frozenset()
        if before is None and gid in existing.groups:
            w.groups_adopted += 1
            current = existing.groups[gid][1]
        elif before is None:
            w.groups_created += 1
        elif before[0].casefold() != name.casefold():
            w.groups_created += 1  # a rename is a create, members moved, then a delete
            w.groups_deleted += 1
        added, removed = len(members - current), len(current - members)
        w.members_added += added
        w.members_removed += removed
        w.member_patches += math.ceil((added + removed) / SCIM_MEMBER_CHANGES_PER_PATCH)
        if before is None or added or removed or before[0] != name:
            w.groups_changed_ids.add(gid)
        groups[gid] = (name, members)
    for gid in applied.groups:
        if gid not in desired.groups:
            w.groups_deleted += 1
            w.groups_changed_ids.add(gid)
    return w, Applied(users, groups)


# -- churn ---------------------------------------------------------------------------


def churn(tenant: Tenant, fraction: float = 0.01, seed: int = 1) -> dict[str, int]:
    """Change `fraction` of the users as a day of directory life does, and some memberships.

    Of the changed users: 40% updated (title, display name), 20% disabled, 20% added
    (each into two groups), 20% deleted. Then as many direct memberships added and
    removed as users changed. Only through the Tenant's mutators, so its change log
    (what Graph delta queries serve) sees every change.
    """
    rng = random.Random(seed)
    with tenant.lock:
        user_ids = sorted(uid for uid, u in tenant.users.items() if u["accountEnabled"])
        group_ids = sorted(tenant.groups)
        n = max(5, round(len(tenant.users) * fraction))
        picked = rng.sample(user_ids, n)
        n_update, n_disable, n_add = round(n * 0.4), round(n * 0.2), round(n * 0.2)
        updated, disabled = picked[:n_update], picked[n_update : n_update + n_disable]
        deleted = set(picked[n_update + n_disable + n_add :])
        for uid in updated:
            user = tenant.users[uid]
            tenant.update_user(uid, jobTitle=f"{user.get('jobTitle') or 'Staff'} II",
                               displayName=f"{user['displayName']} (moved)")
        for uid in disabled:
            tenant.update_user(uid, accountEnabled=False)
        added = []
        for i in range(n_add):
            upn = f"bench.joiner{seed}.{i}@contoso.com"
            uid = tenant.add_user(userPrincipalName=upn, mail=upn, displayName=f"Joiner {seed}-{i}", givenName="Joiner",
                                  surname=f"{seed}-{i}", jobTitle="Engineer", accountEnabled=True, userType="Member")
            for gid in rng.sample(group_ids, 2):
                tenant.add_member(gid, uid)
            added.append(uid)
        for uid in sorted(deleted):
            tenant.delete_user(uid)
        # Membership moves among users who stay: n added, n removed.
        stay = [uid for uid in user_ids if uid not in deleted]
        members_added = members_removed = 0
        while members_added < n:
            gid, uid = rng.choice(group_ids), rng.choice(stay)
            if uid not in tenant.members[gid]:
                tenant.add_member(gid, uid)
                members_added += 1
        with_users = [gid for gid in group_ids if any(m in tenant.users for m in tenant.members[gid])]
        while members_removed < n and with_users:
            gid = rng.choice(with_users)
            users_in = [m for m in tenant.members[gid] if m in tenant.users]
            if not users_in:
                with_users.remove(gid)
                continue
            tenant.remove_member(gid, rng.choice(users_in))
            members_removed += 1
    return {"users_updated": len(updated), "users_disabled": len(disabled), "users_added": len(added),
            "users_deleted": len(deleted), "direct_memberships_added": members_added,
            "direct_memberships_removed": members_removed}


# -- what Graph has to tell -------------------------------------------------------------


@dataclass
class TenantPicture:
    """Users and direct memberships as Graph would serve them: what a delta round compares with."""

    users: dict[str, tuple]
    links: set[tuple[str, str]]  # (group id, member id)
    group_names: dict[str, str]


def picture(tenant: Tenant) -> TenantPicture:
    with tenant.lock:
        return TenantPicture(
            {uid: tuple(u.get(k) for k in sorted(u)) for uid, u in tenant.users.items()},
            {(gid, m) for gid, members in tenant.members.items() for m in members},
            {gid: g["displayName"] for gid, g in tenant.groups.items()},
        )


def graph_changes(before: TenantPicture, after: TenantPicture) -> dict[str, int]:
    """What a delta round must carry: users changed (added, updated, deleted), groups with
    changed direct members (a deleted user's memberships are not among them: Graph reports
    the user @removed instead), renamed/added/deleted groups, and member links changed."""
    users = sum(1 for uid, u in after.users.items() if before.users.get(uid) != u)
    users += sum(1 for uid in before.users if uid not in after.users)
    gone = {uid for uid in before.users if uid not in after.users}
    links = {(g, m) for g, m in before.links ^ after.links if m not in gone}
    groups = {g for g, _ in links}
    groups |= {g for g, name in after.group_names.items() if before.group_names.get(g) != name}
    groups |= {g for g in before.group_names if g not in after.group_names}
    return {"users": users, "groups": len(groups), "links": len(links)}
