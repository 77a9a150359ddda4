"""Product access as code: which synced group holds which product (pure; no I/O).

`[access.groups]` names synced groups (display name or Entra object id) and the products their
members use. Products are resolved against the organization's workspaces; the plan is a diff
of that against Atlassian as observed (the groups' role assignments) and the grants guardsync
recorded as its own:

- grant what is configured and missing;
- revoke only what guardsync granted and is no longer configured; a grant made by hand is never
  revoked (nor recorded as guardsync's, so a later mapping change leaves it alone);
- a renamed group is re-created in Atlassian without access: the new group gets the configured
  grants (and the hand-made ones the old group held) before the old one is deleted, see
  `AccessPlan.grants_for`, which the group loader calls between the two;
- a group deleted because it left scope takes its grants with it: nothing to revoke, the
  records are dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from guardsync.admin import USER_ROLE, Workspace
from guardsync.errors import ConfigError, GuardsyncBlocked
from guardsync.models import DesiredGroup


@dataclass(frozen=True)
class Grant:
    group_id: str  # Entra group id
    group_name: str  # the Atlassian group it applies to (a renamed group's new name)
    workspace_id: str
    product: str  # key@site-host, for people
    recorded: bool = True  # False: a hand-made grant carried over to a renamed group (still not guardsync's)


@dataclass(frozen=True)
class Seats:
    grants: int = 0
    revokes: int = 0
    gain: int = 0  # distinct synced users who gain the product through guardsync's groups
    lose: int = 0


@dataclass
class AccessPlan:
    grants: list[Grant] = field(default_factory=list)
    revokes: list[Grant] = field(default_factory=list)
    # guardsync's grants a renamed group leaves behind (no longer configured): no revoke request, the old
    # group's deletion takes them; revocations all the same, for the guard
    dropped: list[Grant] = field(default_factory=list)
    forget: list[tuple[str, str]] = field(default_factory=list)  # (group id, workspace id) records whose grant is gone
    seats: dict[str, Seats] = field(default_factory=dict)  # by product label
    renamed: frozenset[str] = frozenset()  # group ids whose grants go to the re-created group (during load-groups)
    configured: frozenset[str] = frozenset()  # group ids [access.groups] gives products
    made: frozenset[tuple[str, str]] = frozenset()  # (group id, workspace id) guardsync had recorded when planning

    def counts(self) -> dict[str, int]:
        return {"access_granted": len(self.grants), "access_revoked": len(self.revokes)}

    def grants_for(self, group_id: str) -> list[Grant]:
        """What a renamed group's re-created group gets before the old one is deleted."""
        return [grant for grant in self.grants if grant.group_id == group_id]

    def later_grants(self) -> list[Grant]:
        """The grants load-access makes (after the memberships): all but the renamed groups'."""
        return [grant for grant in self.grants if grant.group_id not in self.renamed]

    def lines(self, granting: bool) -> list[str]:
        """Per product: grants added and removed, users gaining and losing it."""
        out = [f"{product}: grants +{s.grants} -{s.revokes}, synced users gaining {s.gain}, losing {s.lose}"
               for product, s in sorted(self.seats.items())]
        if granting and any(s.gain for s in self.seats.values()):
            out.append("Atlassian may email the users who gain a product")
        return out


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


def resolve_groups(configured: dict[str, list[str]], groups: dict[str, DesiredGroup]) -> dict[str, list[str]]:
    """Entra group id -> product references; a key that names no synced group is a ConfigError."""
    by_name: dict[str, list[str]] = {}
    for group_id, group in groups.items():
        by_name.setdefault(group.display_name.casefold(), []).append(group_id)
    resolved: dict[str, list[str]] = {}
    for key, products in configured.items():
        ids = [key] if key in groups else by_name.get(key.casefold(), [])
        if len(ids) != 1:
            problem = "names no synced group" if not ids else "names several synced groups"
            raise ConfigError(f"[access] groups: {key!r} {problem}; use the display name of a synced group "
                              "(any letter case) or its Entra object id (an id keeps working when the group is renamed)")
        resolved.setdefault(ids[0], []).extend(products)
    return resolved


def desired_grants(configured: dict[str, list[str]], groups: dict[str, DesiredGroup],
                   workspaces: list[Workspace]) -> tuple[dict[str, frozenset[str]], dict[str, Workspace]]:
    """(Entra group id -> workspace ids it should hold, workspaces by id); ConfigError before any write."""
    by_group = resolve_groups(configured, groups)
    products = resolve_products([p for refs in by_group.values() for p in refs], workspaces)
    return ({gid: frozenset(products[p].id for p in refs) for gid, refs in by_group.items()},
            {w.id: w for w in workspaces})


# -- the plan ------------------------------------------------------------------------------------------


def make_access_plan(
    desired: dict[str, frozenset[str]],
    observed: dict[str, frozenset[str]],
    made: set[tuple[str, str]],
    group_kinds: dict[str, str],
    names: dict[str, str],
    workspaces: dict[str, Workspace],
    members_before: dict[str, frozenset[str]],
    members_after: dict[str, frozenset[str]],
    frozen_groups: frozenset[str] = frozenset(),
) -> AccessPlan:
    """The grants to add and revoke. `observed`: the user-role grants each group holds now in Atlassian
    (a renamed group: the old one's); `made`: the (group, workspace) grants guardsync recorded;
    `group_kinds`: this run's create/rename/delete by group id; `names`: each group's name after the run."""
    made_by_group: dict[str, set[str]] = {}
    for group_id, workspace_id in made:
        made_by_group.setdefault(group_id, set()).add(workspace_id)
    plan = AccessPlan(renamed=frozenset(g for g, kind in group_kinds.items() if kind == "rename" and g in desired),
                      configured=frozenset(desired), made=frozenset(made))
    final: dict[str, frozenset[str]] = {}
    for group_id in sorted(set(desired) | set(made_by_group)):
        if group_id in frozen_groups:
            continue  # quarantined this run: nothing about it changes
        mine = made_by_group.get(group_id, set())
        current = observed.get(group_id, frozenset())
        wanted = desired.get(group_id)
        if wanted is None or group_kinds.get(group_id) == "delete":
            # No longer configured, or gone: revoke what guardsync made if the group stays; else the group takes them along.
            if group_id in names and group_kinds.get(group_id) != "delete":
                plan.revokes += [_grant(group_id, names, w, workspaces) for w in sorted(mine & current)]
                final[group_id] = current - mine
            plan.forget += [(group_id, w) for w in sorted(mine - current if group_id in names else mine)]
            continue
        if group_id in plan.renamed:  # the new group starts with nothing: configured and hand-made grants go to it
            hand_made = current - mine - wanted
            plan.grants += [_grant(group_id, names, w, workspaces) for w in sorted(wanted)]
            plan.grants += [_grant(group_id, names, w, workspaces, recorded=False) for w in sorted(hand_made)]
            plan.forget += [(group_id, w) for w in sorted(mine - wanted)]
            plan.dropped += [_grant(group_id, names, w, workspaces) for w in sorted((mine & current) - wanted)]
            final[group_id] = wanted | hand_made
            continue
        plan.grants += [_grant(group_id, names, w, workspaces) for w in sorted(wanted - current)]
        plan.revokes += [_grant(group_id, names, w, workspaces) for w in sorted((mine & current) - wanted)]
        plan.forget += [(group_id, w) for w in sorted(mine - current - wanted)]  # removed by hand, no longer wanted
        final[group_id] = (current - (mine - wanted)) | wanted
    plan.seats = _seats(plan, observed, final, workspaces, members_before, members_after)
    return plan


def _grant(group_id: str, names: dict[str, str], workspace_id: str, workspaces: dict[str, Workspace],
           recorded: bool = True) -> Grant:
    workspace = workspaces.get(workspace_id)
    return Grant(group_id, names.get(group_id, group_id), workspace_id, workspace.label if workspace else workspace_id,
                 recorded)


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

    managed = set(after) | {g for g, _ in plan.forget}
    had = holders({g: w for g, w in before.items() if g in managed}, members_before)
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
