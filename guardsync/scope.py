"""Scope: which groups and users the run is about, per the contract (pure, pandas).

Order of the rules matters and follows DESIGN.md: guests are excluded; users whose
identifier has a domain outside the allowed ones are excluded; users with a
missing or malformed identifier, or a case-insensitive duplicate, go on to the
users gate, whose `warning` expectations quarantine them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from guardsync.config import AttributeSettings, SyncSettings
from guardsync.errors import ConfigError
from guardsync.models import ATTRIBUTE_FIELDS, DesiredGroup, DesiredUser, Snapshot, text_frame

IDENTIFIER_FIELD = {"upn": "userPrincipalName", "email": "mail"}


@dataclass
class Scoped:
    """Candidates for the gates: users in scope, synced groups, their effective members."""

    users: pd.DataFrame  # id, identifier, identifier_key, enabled, then one column per ATTRIBUTE_FIELDS (text or None)
    groups: pd.DataFrame  # id, display_name
    memberships: pd.DataFrame  # group_id, user_id: synced groups x in-scope users (enabled or not)
    excluded: dict[str, int]  # reason -> count
    allowed_domains: list[str]


def allowed_domains(snapshot: Snapshot, configured: list[str]) -> list[str]:
    """The configured domains, all verified; or every verified domain but the initial one."""
    verified = {domain.casefold(): domain for domain in snapshot.verified_domains}
    if not configured:
        initial = (snapshot.initial_domain or "").casefold()
        return sorted(key for key in verified if key != initial and not key.endswith(".onmicrosoft.com"))
    unverified = [d for d in configured if d.casefold() not in verified]
    if unverified:
        raise ConfigError(
            f"[sync] domains: {', '.join(unverified)} not verified in tenant {snapshot.organization}; "
            f"verify it in Entra ID or remove it (verified: {', '.join(sorted(verified.values()))})"
        )
    return sorted({d.casefold() for d in configured})


def select_groups(groups: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """All groups, or exactly the named ones (displayName case-insensitive, or object id)."""
    if not names:
        return groups[["id", "displayName"]].rename(columns={"displayName": "display_name"})
    keys = identity_key(groups["displayName"].fillna(""))
    chosen = []
    for name in names:
        key = identity_key(pd.Series([name])).iloc[0]
        match = groups[(keys == key) | (groups["id"] == name)]
        if len(match) == 0:
            raise ConfigError(f"[sync] groups: no group named {name!r} in the tenant; check the spelling or use its object id")
        if len(match) > 1:
            ids = ", ".join(match["id"].head(5))
            raise ConfigError(f"[sync] groups: {len(match)} groups are named {name!r} ({ids}); use the object id of the one to sync")
        chosen.append(match)
    picked = pd.concat(chosen).drop_duplicates("id")
    return picked[["id", "displayName"]].rename(columns={"displayName": "display_name"}).reset_index(drop=True)


def identity_key(values: pd.Series) -> pd.Series:
    """What makes two identifiers or names the same: letter case and Unicode normalisation aside
    (é typed as one code point or as e + accent is one name to a person, and to Atlassian)."""
    return values.str.normalize("NFC").str.casefold().str.normalize("NFC")


def domain_of(identifiers: pd.Series) -> pd.Series:
    """The casefolded part after the single '@'; missing when there is no single '@'."""
    parts = identifiers.str.split("@")
    well_formed = parts.str.len() == 2
    # astype: when no identifier is well formed, where() leaves all-NaN floats, which .str refuses
    return parts.str[1].where(well_formed).astype("str").str.casefold()


def scope(snapshot: Snapshot, memberships: pd.DataFrame, sync: SyncSettings,
          attributes: AttributeSettings = AttributeSettings()) -> Scoped:
    """Apply the contract's scope rules to a snapshot and its flattened memberships; each user's
    attributes are taken from the Entra sources `attributes` maps (missing, null or empty: None)."""
    domains = allowed_domains(snapshot, sync.domains)
    # Empty frames, however they were built, are text frames here: .str and merges work on them.
    groups = select_groups(text_frame(snapshot.groups, list(snapshot.groups.columns)), sync.groups)
    group_members = memberships[memberships["group_id"].isin(groups["id"])]

    users = text_frame(snapshot.users, list(snapshot.users.columns))
    if sync.groups:  # pilot: only the transitive members of the named groups
        users = users[users["id"].isin(group_members["user_id"])]
    excluded: dict[str, int] = {}

    guests = users["userPrincipalName"].fillna("").str.contains("#EXT#", regex=False)
    excluded["guest"] = int(guests.sum())
    users = users[~guests]

    identifier = users[IDENTIFIER_FIELD[sync.identifier]]
    domain = domain_of(identifier.fillna(""))
    outside = domain.notna() & (domain != "") & ~domain.isin(domains)
    excluded["domain"] = int(outside.sum())
    users, identifier = users[~outside], identifier[~outside]

    mapping = attributes.mapping()
    candidates = pd.DataFrame(
        {
            "id": users["id"],
            "identifier": identifier,
            "identifier_key": identity_key(identifier),
            "enabled": users["accountEnabled"].fillna(False).astype(bool),
            **{field: attribute_values(users, mapping.get(field)) for field in ATTRIBUTE_FIELDS},
        }
    ).reset_index(drop=True)
    in_scope = group_members[group_members["user_id"].isin(candidates["id"])].reset_index(drop=True)
    return Scoped(candidates, groups, in_scope, excluded, domains)


def attribute_values(users: pd.DataFrame, source: str | None) -> pd.Series:
    """One attribute's value for each user: the source's text, stripped; None when the attribute is
    off, the source was not read, or the value is missing, null or empty (so nothing is sent)."""
    if not source or source not in users.columns:
        return pd.Series([None] * len(users), index=users.index, dtype=object)
    values = [_text(value) for value in users[source].tolist()]
    return pd.Series(values, index=users.index, dtype=object)


def _text(value) -> str | None:
    if isinstance(value, list):  # a list takes its first value
        value = value[0] if value else None
    if value is None or (isinstance(value, float) and value != value):  # NaN: missing
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    return text or None


def desired_users(candidates: pd.DataFrame, quarantined: frozenset[str],
                  left_out: dict[str, frozenset[str]] | None = None) -> dict[str, DesiredUser]:
    """Users Atlassian should hold (quarantined ones are frozen: left out, handled by the plan).

    `left_out` maps an attribute field to the users whose value Atlassian would refuse: their
    value is not sent (the user still is)."""
    kept = candidates[~candidates["id"].isin(quarantined)]
    columns = []
    for field in ATTRIBUTE_FIELDS:
        column = kept[field].where(kept[field].notna(), "")
        dropped = (left_out or {}).get(field)
        if dropped:
            column = column.where(~kept["id"].isin(dropped), "")
        columns.append(column.tolist())
    return {
        row_id: DesiredUser(row_id, identifier, active=bool(enabled), **dict(zip(ATTRIBUTE_FIELDS, values)))
        for row_id, identifier, enabled, *values in zip(kept["id"], kept["identifier"], kept["enabled"], *columns)
    }


def desired_groups(groups: pd.DataFrame, memberships: pd.DataFrame, users: dict[str, DesiredUser]) -> dict[str, DesiredGroup]:
    """Each synced group with its transitive, in-scope, enabled, non-quarantined users."""
    enabled = {uid for uid, user in users.items() if user.active}
    kept = memberships[memberships["user_id"].isin(enabled)]
    members = kept.groupby("group_id")["user_id"].agg(frozenset).to_dict()
    return {
        gid: DesiredGroup(gid, name or "", members.get(gid, frozenset()))
        for gid, name in zip(groups["id"], groups["display_name"])
    }


def groups_gate_frame(groups: dict[str, DesiredGroup]) -> pd.DataFrame:
    names = pd.Series([g.display_name for g in groups.values()], dtype=object)
    return pd.DataFrame(
        {
            "id": list(groups),
            "display_name": names,
            "display_name_key": identity_key(names),
            "member_count": [len(g.members) for g in groups.values()],
        }
    )


def memberships_gate_frame(groups: dict[str, DesiredGroup]) -> pd.DataFrame:
    pairs = [(gid, uid) for gid, group in groups.items() for uid in group.members]
    return pd.DataFrame(pairs, columns=["group_id", "user_id"])
