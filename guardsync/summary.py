"""The run summary: the counts the contract promises, for people and for artifacts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COUNT_KEYS = [
    "users_created", "users_updated", "users_deactivated", "users_reactivated", "users_adopted",
    "groups_created", "groups_renamed", "groups_deleted", "groups_adopted",
    "members_added", "members_removed",
]
IDENTIFIER_FIELD = {"upn": "userPrincipalName", "email": "mail"}


@dataclass
class RunSummary:
    run_id: str
    mode: str  # sync | dry-run
    status: str  # completed | blocked | failed
    identifier: str
    counts: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantined_examples: list[str] = field(default_factory=list)  # "identifier (rule)", first 20
    failures: list[str] = field(default_factory=list)
    new_groups: list[str] = field(default_factory=list)  # need product access in Atlassian administration
    renamed_groups: list[str] = field(default_factory=list)
    first_sync: bool = False  # nothing was managed before this run: SSO can be set up next
    last_full_read: str | None = None  # when Entra was last read in full (delta runs merge into it)
    drift: list[str] = field(default_factory=list)  # managed objects changed by hand in Atlassian, restored
    handovers: list[str] = field(default_factory=list)  # identifiers passed from one Entra user to another
    values_left_out: dict[str, int] = field(default_factory=dict)  # attribute -> users sent without a refused value
    requests: dict[str, int] = field(default_factory=dict)
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        c = {key: self.counts.get(key, 0) for key in COUNT_KEYS}
        verb = "would be " if self.mode == "dry-run" else ""
        out = [
            f"Summary of run {self.run_id} ({self.mode}, {self.status}); identifier: {self.identifier} "
            f"({IDENTIFIER_FIELD[self.identifier]}), SSO must use the same",
            f"  users {verb}created {c['users_created']}, updated {c['users_updated']}, deactivated "
            f"{c['users_deactivated']}, reactivated {c['users_reactivated']}, adopted {c['users_adopted']}",
            f"  groups {verb}created {c['groups_created']}, renamed {c['groups_renamed']}, deleted "
            f"{c['groups_deleted']}, adopted {c['groups_adopted']}",
            f"  members {verb}added {c['members_added']}, removed {c['members_removed']}",
            "  users excluded: " + _by_key(self.excluded),
            "  users quarantined: " + _by_key(self.quarantined),
        ]
        if self.values_left_out:
            out.append("  values left out (Atlassian would refuse them; the users still sync): "
                       + _by_key(self.values_left_out))
        if self.quarantined_examples:
            more = sum(self.quarantined.values()) - len(self.quarantined_examples)
            out.append("    " + "; ".join(self.quarantined_examples) + (f"; and {more} more" if more > 0 else ""))
        if self.new_groups:
            out.append(
                f"  new groups need product access in Atlassian administration: {', '.join(self.new_groups[:20])}"
                + (f" and {len(self.new_groups) - 20} more" if len(self.new_groups) > 20 else "")
            )
        if self.renamed_groups:
            out.append(f"  renamed groups were re-created: grant product access again to {', '.join(self.renamed_groups[:20])}")
        if self.last_full_read:
            out.append(f"  last full read of Entra: {self.last_full_read} (runs in between read changes only)")
        if self.drift:
            out.append("  restored after changes by hand in Atlassian: " + "; ".join(self.drift))
        if self.counts.get("users_gone"):
            out.append(f"  accounts deleted by hand in Atlassian whose users left, recorded as gone: {self.counts['users_gone']}")
        if self.handovers:
            out.append(f"  identifiers handed over ({len(self.handovers)}): " + "; ".join(self.handovers[:20]))
        if self.failures:
            out.append(f"  failed writes: {len(self.failures)}")
            out.extend(f"    {line}" for line in self.failures[:20])
        if self.requests:
            out.append("  requests: " + _by_key(self.requests))
        if self.message:
            out.append(f"  {self.message}")
        return out


def _by_key(counts: dict[str, int]) -> str:
    shown = [f"{key} {value}" for key, value in sorted(counts.items()) if value]
    return ", ".join(shown) if shown else "none"
