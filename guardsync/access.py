"""Product access as code: which synced group holds which product (pure; no I/O).

`[access.groups]` names synced groups (display name or Entra object id) and the products their
members use. Products are resolved against the organization's workspaces; the plan is a diff
of that against Atlassian as observed (the groups' role assignments) and the grant ledger, which
keeps each (Entra group, workspace) grant's maker, guardsync or by hand (guardsync.state):

- grant what is configured and missing; a grant guardsync makes is guardsync's;
- revoke only guardsync's grants that are no longer configured; a hand-made grant is never revoked,
  configured or not, and stays hand-made (also across a rename and a mapping change);
- a renamed group is re-created in Atlassian without access: the new group receives every grant the
  old one held, each with its maker, before the old one is deleted (`AccessPlan.grants_for`, which the
  group loader calls between the two), for every synced group; guardsync's grants no longer configured
  stay behind and go with the old group (revocations all the same, for the guard);
- a group created this run holds nothing yet, whatever its name held before;
- a group deleted because it left scope takes its grants with it: nothing to revoke;
- the ledger changes only once Atlassian confirmed: a grant or revocation when it answered, the rows
  of a renamed or deleted group's grants once the old group is gone (the loader checks the record); one
  exception keeps a maker from being lost: a new grant's row is written, with its maker, before it is asked
  for (and taken back if Atlassian refuses it), so a run killed in between leaves it guardsync's, never
  "seen, made by nobody": a grant held and guardsync's, or gone and forgotten, as any of guardsync's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from guardsync.admin import USER_ROLE, Workspace
from guardsync.changes import Hold
from guardsync.errors import ConfigError, GuardsyncBlocked
from guardsync.models import DesiredGroup

GUARDSYNC, BY_HAND = "guardsync", "hand"  # a grant's maker: only guardsync's are ever revoked


@dataclass(frozen=True)
class Grant:
    group_id: str  # Entra group id
    group_name: str  # the Atlassian group it applies to (a renamed group's new name)
    workspace_id: str
    product: str  # key@site-host, for people
    maker: str = GUARDSYNC  # a hand-made grant carried to a renamed group stays hand-made


@dataclass(frozen=True)
class Seats:
    grants: int = 0
    revokes: int = 0
    gain: int = 0  # distinct synced users who gain the product through guardsync's groups
    lose: int = 0


@dataclass
class AccessPlan:
    grants: list[Grant] = field(default_factory=list)  # each with its maker
    revokes: list[Grant] = field(default_factory=list)
    # guardsync's grants a renamed group leaves behind (no longer configured): no revoke request, the old
    # group's deletion takes them; revocations all the same, for the guard
    dropped: list[Grant] = field(default_factory=list)
    hand_made: list[Grant] = field(default_factory=list)  # seen, made by hand, not yet in the ledger as such
    # ledger rows of grants that are gone (removed by hand), or go with their group: forgotten once it is gone
    forget: list[tuple[str, str]] = field(default_factory=list)
    seats: dict[str, Seats] = field(default_factory=dict)  # by product label
    renamed: dict[str, str] = field(default_factory=dict)  # group id -> new name: grants go to it during load-groups
    goes: frozenset[str] = frozenset()  # group ids whose group is deleted (or gone): its grants with it
    configured: frozenset[str] = frozenset()  # group ids [access.groups] gives products
    # What each configured group holds after the run, with the Organizations API ids found while planning (a
    # renamed group's: its old group's): what a run with no change in Entra checks (guardsync.access_load)
    expected: dict[str, frozenset[str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # group id -> its name after the run (configured groups)
    org_ids: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # configured groups left as they are this run, and why
    holds: list[Hold] = field(default_factory=list)  # approvable guards it trips (revocations, seat capacity)

    def counts(self) -> dict[str, int]:
        return {"access_granted": len(self.grants), "access_revoked": len(self.revokes)}

    def grants_for(self, group_id: str) -> list[Grant]:
        """What a renamed group's re-created group gets before the old one is deleted."""
        return [grant for grant in self.grants if grant.group_id == group_id]

    def later_grants(self) -> list[Grant]:
        """The grants load-access makes (after the memberships): all but the renamed groups'."""
        return [grant for grant in self.grants if grant.group_id not in self.renamed]

    def seat_lines(self, granting: bool) -> list[str]:
        """Per product: grants added and removed, users gaining and losing it."""
        out = [f"{product}: grants +{s.grants} -{s.revokes}, synced users gaining {s.gain}, losing {s.lose}"
               for product, s in sorted(self.seats.items())]
        if granting and any(s.gain for s in self.seats.values()):
            out.append("Atlassian may email the users who gain a product")
        return out

    def lines(self, granting: bool) -> list[str]:
        """What the summary shows: the seat lines, then the configured groups left as they are, and why."""
        return self.seat_lines(granting) + self.notes


# -- resolving the configuration ---------------------------------------------------------------------


def resolve_products(references: list[str], workspaces: list[Workspace]) -> dict[str, Workspace]:
    """Each configured product reference (key, or key@site-host) -> its one workspace; ConfigError otherwise."""
    resolved = {}
    for reference in sorted(set(references)):
        key, _, host = reference.partition("@")
        same_key = [w for w in workspaces if w.product == key]
        matches = [w for w in same_key if not host or w.host.casefold() == host.casefold()]
        if not matches:
            if same_key:
                raise ConfigError(f"[access] groups: the organization has no {key} on {host}; it has {key} on "
                                  f"{', '.join(sorted(w.host for w in same_key))}: write {key}@SITE with one of those")
            have = ", ".join(sorted({w.product for w in workspaces})) or "none"
            raise ConfigError(f"[access] groups: the organization has no product {key!r}; it has {have}")
        if len(matches) > 1:
            raise ConfigError(f"[access] groups: the organization has {key} on several sites "
                              f"({', '.join(sorted(w.host for w in matches))}): write {key}@SITE, e.g. "
                              f"{key}@{sorted(w.host for w in matches)[0]}")
        resolved[reference] = matches[0]
    return resolved


def resolve_groups(configured: dict[str, list[str]], groups: dict[str, DesiredGroup],
                   quarantined: dict[str, str] | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """(Entra group id -> product references, notes). A key that names no synced group is a ConfigError. A key
    that names groups the groups gate quarantined this run (`quarantined`: id -> name; Entra groups sharing one
    name) is left as it is, product access included, with a note naming them and what to do."""
    quarantined = quarantined or {}
    by_name: dict[str, list[str]] = {}
    for group_id, name in [(gid, group.display_name) for gid, group in groups.items()] + list(quarantined.items()):
        by_name.setdefault(name.casefold(), []).append(group_id)
    resolved: dict[str, list[str]] = {}
    notes = []
    for key, products in configured.items():
        ids = [key] if key in groups or key in quarantined else by_name.get(key.casefold(), [])
        if held := sorted(gid for gid in ids if gid in quarantined):
            notes.append(f"[access] groups: {key!r} names {_entra_groups(held)}, quarantined this run by the groups "
                         "gate (Entra groups sharing one name): their product access is left as it is until all but "
                         "one of the groups of that name are renamed in Entra ID")
            continue
        if len(ids) != 1:
            problem = "names no synced group" if not ids else "names several synced groups"
            raise ConfigError(f"[access] groups: {key!r} {problem}; use the display name of a synced group "
                              "(any letter case) or its Entra object id (an id keeps working when the group is renamed)")
        resolved.setdefault(ids[0], []).extend(products)
    return resolved, notes


def _entra_groups(ids: list[str]) -> str:
    return f"Entra group {ids[0]}" if len(ids) == 1 else f"{len(ids)} Entra groups ({', '.join(ids)})"


def desired_grants(configured: dict[str, list[str]], groups: dict[str, DesiredGroup], workspaces: list[Workspace],
                   quarantined: dict[str, str] | None = None,
                   ) -> tuple[dict[str, frozenset[str]], dict[str, Workspace], list[str]]:
    """(Entra group id -> workspace ids it should hold, workspaces by id, notes); ConfigError before any write.
    Every configured product is resolved, a quarantined group's too: a wrong key is wrong whatever the groups."""
    products = resolve_products([p for refs in configured.values() for p in refs], workspaces)
    by_group, notes = resolve_groups(configured, groups, quarantined)
    return ({gid: frozenset(products[p].id for p in refs) for gid, refs in by_group.items()},
            {w.id: w for w in workspaces}, notes)


# -- the plan ------------------------------------------------------------------------------------------


def make_access_plan(
    desired: dict[str, frozenset[str]],
    observed: dict[str, frozenset[str]],
    ledger: dict[tuple[str, str], str],
    group_kinds: dict[str, str],
    names: dict[str, str],
    workspaces: dict[str, Workspace],
    members_before: dict[str, frozenset[str]],
    members_after: dict[str, frozenset[str]],
    frozen_groups: frozenset[str] = frozenset(),
    org_ids: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> AccessPlan:
    """The grants to add and revoke. `observed`: the user-role grants each group holds now in Atlassian, for
    the groups found there (a renamed group: the old one's); `ledger`: each known grant's maker;
    `group_kinds`: this run's create/rename/adopt/delete by group id; `names`: each synced group's name after
    the run; `org_ids`: the Organizations API ids of the groups observed."""
    known: dict[str, dict[str, str]] = {}
    for (group_id, workspace_id), maker in ledger.items():
        known.setdefault(group_id, {})[workspace_id] = maker
    renamed = {gid for gid, kind in group_kinds.items() if kind == "rename" and gid in names}
    plan = AccessPlan(renamed={gid: names[gid] for gid in sorted(renamed)}, configured=frozenset(desired),
                      org_ids=dict(org_ids or {}), notes=list(notes or []))
    before: dict[str, frozenset[str]] = {}
    after: dict[str, frozenset[str]] = {}
    goes = set()
    for group_id in sorted(set(desired) | set(known) | set(observed) | renamed):
        if group_id in frozen_groups:
            continue  # quarantined this run: nothing about it changes
        kind, rows, wanted = group_kinds.get(group_id), known.get(group_id, {}), desired.get(group_id, frozenset())

        def grant(workspace_id: str, maker: str = GUARDSYNC) -> Grant:
            return _grant(group_id, names, workspace_id, workspaces, maker)

        if group_id not in names or kind == "delete":  # the group goes (or went) and takes its grants along
            goes.add(group_id)
            before[group_id] = observed.get(group_id, frozenset(rows))
            plan.forget += [(group_id, w) for w in sorted(rows)]
            continue
        seen = group_id in observed and kind != "create"
        if kind == "create":
            current = frozenset()  # a group created this run holds nothing, whatever its name held before
        elif seen:
            current = observed[group_id]
        else:  # out of the Organizations API's sight: a renamed group carries what the ledger knew its old group held
            current = frozenset(rows) if kind == "rename" else frozenset()
        made = {w for w in current if rows.get(w, BY_HAND) == GUARDSYNC}
        unwanted = made - wanted  # guardsync's, no longer configured
        if kind == "rename":  # the new group starts with nothing: every grant the old one held goes to it, maker and all
            kept = current - unwanted
            plan.grants += [grant(w, GUARDSYNC if w in made or w not in current else BY_HAND) for w in sorted(kept | wanted)]
            plan.dropped += [grant(w) for w in sorted(unwanted)]
            plan.forget += [(group_id, w) for w in sorted(unwanted)]
        else:
            plan.grants += [grant(w) for w in sorted(wanted - current)]
            plan.revokes += [grant(w) for w in sorted(unwanted)]
        if seen:
            plan.hand_made += [grant(w, BY_HAND) for w in sorted(current - made) if rows.get(w) != BY_HAND]
            plan.forget += [(group_id, w) for w in sorted(set(rows) - current - wanted)]  # removed by hand meanwhile
        before[group_id], after[group_id] = current, (current - unwanted) | wanted
        if group_id in desired:
            plan.expected[group_id], plan.names[group_id] = wanted, names[group_id]
    plan.goes = frozenset(goes)
    plan.seats = _seats(plan, before, after, workspaces, members_before, members_after)
    return plan


def _grant(group_id: str, names: dict[str, str], workspace_id: str, workspaces: dict[str, Workspace],
           maker: str = GUARDSYNC) -> Grant:
    workspace = workspaces.get(workspace_id)
    return Grant(group_id, names.get(group_id, group_id), workspace_id, workspace.label if workspace else workspace_id,
                 maker)


def _seats(plan: AccessPlan, before: dict[str, frozenset[str]], after: dict[str, frozenset[str]],
           workspaces: dict[str, Workspace], members_before: dict[str, frozenset[str]],
           members_after: dict[str, frozenset[str]]) -> dict[str, Seats]:
    """Per product, users holding it through guardsync's groups before and after: who gains, who loses."""
    def holders(grants: dict[str, frozenset[str]], members: dict[str, frozenset[str]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for group_id, workspace_ids in grants.items():
            for workspace_id in workspace_ids:
                out.setdefault(workspace_id, set()).update(members.get(group_id, frozenset()))
        return out

    had = holders(before, members_before)
    has = holders(after, members_after)
    granted = Counter(g.workspace_id for g in plan.grants)
    revoked = Counter(g.workspace_id for g in plan.revokes)
    seats = {}
    for workspace_id in set(had) | set(has) | set(granted) | set(revoked):
        gain, lose = has.get(workspace_id, set()) - had.get(workspace_id, set()), had.get(workspace_id, set()) - has.get(workspace_id, set())
        if gain or lose or granted[workspace_id] or revoked[workspace_id]:
            workspace = workspaces.get(workspace_id)
            seats[workspace.label if workspace else workspace_id] = Seats(granted[workspace_id], revoked[workspace_id],
                                                                          len(gain), len(lose))
    return seats


# -- guards and gate ---------------------------------------------------------------------------------------


def too_many_revocations(plan: AccessPlan, max_revocations: int) -> GuardsyncBlocked | None:
    """More revocations than [access] max_revocations; --allow-mass-deactivation does not lift it."""
    taken = plan.revokes + plan.dropped  # dropped: left behind by a renamed group, gone with the old group
    if len(taken) <= max_revocations:
        return None
    shown = ", ".join(f"{g.product} from {g.group_name}" for g in taken[:10])
    return GuardsyncBlocked(
        "max_revocations",
        f"this run would revoke {len(taken)} product grants ({shown}), over the limit of {max_revocations} "
        f"([access] max_revocations)",
        "Check [access.groups] for an accidental change; if the revocations are intended, raise [access] "
        "max_revocations for one run (--allow-mass-deactivation does not lift this guard)",
    )


def over_capacity(plan: AccessPlan, workspaces: dict[str, Workspace]) -> GuardsyncBlocked | None:
    """A workspace whose seat capacity the users gaining it would exceed."""
    by_label = {w.label: w for w in workspaces.values()}
    full = []
    for label, seats in sorted(plan.seats.items()):
        workspace = by_label.get(label)
        if workspace is None or workspace.capacity is None or not seats.gain:
            continue
        in_use = workspace.usage or 0
        if in_use + seats.gain - seats.lose > workspace.capacity:
            full.append(f"{label} (capacity {workspace.capacity} seats, {in_use} in use, {seats.gain} users would gain it)")
    if not full:
        return None
    return GuardsyncBlocked("seat_capacity", f"the grants would exceed the seats of {'; '.join(full)}",
                            "Raise the product's user limit in Atlassian administration (Billing), or grant it to "
                            "fewer or smaller groups in [access.groups]")


def gate_frame(plan: AccessPlan) -> pd.DataFrame:
    """One row per planned grant or revocation: what expectations/access.json checks."""
    rows = [{"group_id": g.group_id, "group_name": g.group_name, "workspace_id": g.workspace_id, "product": g.product,
             "action": action, "role": USER_ROLE}
            for action, grants in (("grant", plan.grants), ("revoke", plan.revokes)) for g in grants]
    return pd.DataFrame(rows, columns=["group_id", "group_name", "workspace_id", "product", "action", "role"])
