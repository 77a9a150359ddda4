"""The run summary: the counts the contract promises, for people and for artifacts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from guardsync.text import md, plain

COUNT_KEYS = [
    "users_created", "users_updated", "users_deactivated", "users_reactivated", "users_adopted",
    "groups_created", "groups_renamed", "groups_deleted", "groups_adopted",
    "members_added", "members_removed",
]
ACCESS_KEYS = ["access_granted", "access_revoked"]  # with [access] only
IDENTIFIER_FIELD = {"upn": "userPrincipalName", "email": "mail"}
# The run's log record of the summary carries this attribute (logger `extra`): the command line,
# which prints the summary itself, keeps that record off the terminal (the run's log keeps it).
SUMMARY_LOG_MARK = "guardsync_summary"


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
    access: list[str] | None = None  # with [access]: per product grants +/- and users gaining/losing it
    values_left_out: dict[str, int] = field(default_factory=dict)  # attribute -> users sent without a refused value
    requests: dict[str, int] = field(default_factory=dict)
    message: str = ""
    plan_changes: list[dict] = field(default_factory=list)  # dry runs: the first changes, as plan-changes rows
    planned_changes: int = 0  # dry runs: how many rows the whole plan has
    approval: str = ""  # a held plan this run applied: whose, approved by whom, where, why
    held_run: str = ""  # blocked with its plan held: the run id `guardsync approve` takes

    def as_dict(self) -> dict:
        return asdict(self)

    def access_lines(self) -> list[str]:
        """With [access]: the grants made, per product the grants +/- and synced users gaining/losing it, and
        on a granting run the notice that Atlassian may email them; nothing without [access]."""
        if self.access is None:
            return []
        verb = "would be " if self.mode == "dry-run" else ""
        a = {key: self.counts.get(key, 0) for key in ACCESS_KEYS}
        out = [f"  product access {verb}granted {a['access_granted']}, revoked {a['access_revoked']}"]
        out += [f"    {line}" for line in self.access if not line.startswith("Atlassian may")]
        if any(line.startswith("Atlassian may") for line in self.access):
            out.append("    " + ("Atlassian may email the users who gain a product when this runs for real" if verb
                                 else "Atlassian may email the users who gained a product"))
        return out

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
            *self.access_lines(),
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
        if self.approval:
            out.append(f"  {self.approval}")
        if self.message:
            out.append(f"  {self.message}")
        return [plain(line) for line in out]  # names from Entra or Atlassian never break a log line

    def markdown(self) -> str:
        """The `summary` artifact: what stopped the run first (block reason, failures), then tables."""
        verb = "would be " if self.mode == "dry-run" else ""
        out = [f"# Summary: {self.mode} {self.status}", "",
               f"Run `{self.run_id}`; identifier: {self.identifier} ({IDENTIFIER_FIELD.get(self.identifier, '?')}), "
               "SSO must use the same.", ""]
        if self.status == "blocked":
            out += ["## Blocked: nothing was written by the blocked load or any after it", "", _cell(self.message), ""]
        elif self.status == "failed" and self.message and not self.failures:
            out += ["## Failed", "", _cell(self.message), ""]
        if self.failures:
            out += [f"## Failed writes: {len(self.failures)}", ""]
            out += markdown_table(("#", "write"), [(n, line) for n, line in enumerate(self.failures[:100], 1)])
            if len(self.failures) > 100:
                out.append(f"and {len(self.failures) - 100} more")
            out.append("")
        objects = list(dict.fromkeys(key.partition("_")[0] for key in COUNT_KEYS))  # users, groups, members
        changes = list(dict.fromkeys(key.partition("_")[2] for key in COUNT_KEYS))  # created, updated, ...
        rows = [[kind] + [self.counts.get(f"{kind}_{change}", 0) if f"{kind}_{change}" in COUNT_KEYS else ""
                          for change in changes] for kind in objects]
        out += [f"## Changes{' (dry run: would be made)' if verb else ''}", ""] + markdown_table(["object"] + changes, rows) + [""]
        out += ["## Users excluded", ""] + _counts_table("reason", self.excluded) + [""]
        out += ["## Users quarantined (frozen this run)", ""] + _counts_table("rule", self.quarantined) + [""]
        if self.quarantined_examples:
            out += ["Quarantined: " + "; ".join(_cell(example) for example in self.quarantined_examples), ""]
        notes = [
            ("new groups need product access in Atlassian administration", ", ".join(self.new_groups)),
            ("renamed groups were re-created: grant product access again to", ", ".join(self.renamed_groups)),
            ("restored after changes by hand in Atlassian", "; ".join(self.drift)),
            ("identifiers handed over from one Entra user to another", "; ".join(self.handovers)),
            ("last full read of Entra", self.last_full_read or ""),
            ("requests", _by_key(self.requests) if self.requests else ""),
            ("approval", self.approval),
            ("note", self.message if self.status not in ("blocked", "failed") else ""),
        ]
        notes = [(label, value) for label, value in notes if value]
        if notes:
            out += ["## Notes", ""] + markdown_table(("about", "details"), notes)
        return "\n".join(out).rstrip() + "\n"


def _counts_table(label: str, counts: dict[str, int]) -> list[str]:
    rows = [(key, value) for key, value in sorted(counts.items()) if value]
    return markdown_table((label, "users"), rows) if rows else ["none"]


def _cell(value) -> str:
    """A value inside a markdown table cell or line: its text (guardsync.text.md), on one line."""
    return md(value)


def markdown_table(header, rows) -> list[str]:
    """A markdown table's lines (cells escaped) for artifacts."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _by_key(counts: dict[str, int]) -> str:
    shown = [f"{key} {value}" for key, value in sorted(counts.items()) if value]
    return ", ".join(shown) if shown else "none"
