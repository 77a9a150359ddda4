"""Typed records that cross stage boundaries.

The Graph snapshot is a set of pandas frames (bulk data, vectorised logic); the
desired state and the plan are small frozen dataclasses, hashable and easy to diff.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import pandas as pd

# Columns of the frames in a Snapshot. Graph field names are kept as Graph spells them.
USER_COLUMNS = [
    "id",
    "userPrincipalName",
    "mail",
    "displayName",
    "givenName",
    "surname",
    "jobTitle",
    "accountEnabled",
    "userType",
]
GROUP_COLUMNS = ["id", "displayName"]
EDGE_COLUMNS = ["group_id", "member_id", "member_type"]  # direct memberships
MEMBERSHIP_COLUMNS = ["group_id", "user_id"]  # effective (flattened) memberships


@dataclass(frozen=True)
class Attribute:
    """An Atlassian user attribute guardsync can send, and the Entra property it takes by default."""

    key: str  # as [attributes] names it (SCIM path; phoneNumbers by type)
    field: str  # the DesiredUser field that holds it
    default: str  # the default Entra (Graph) source; "" = not sent unless mapped


# DESIGN.md "Attributes": the defaults are what Atlassian's own Entra sync sends.
ATTRIBUTES = (
    Attribute("displayName", "display_name", "displayName"),
    Attribute("name.givenName", "given_name", "givenName"),
    Attribute("name.familyName", "family_name", "surname"),
    Attribute("title", "title", "jobTitle"),
    Attribute("preferredLanguage", "preferred_language", "preferredLanguage"),
    Attribute("phoneNumbers.work", "phone_work", "businessPhones"),
    Attribute("phoneNumbers.mobile", "phone_mobile", "mobilePhone"),
    Attribute("department", "department", "department"),
    Attribute("organization", "organization", ""),
    Attribute("timezone", "timezone", ""),
    Attribute("nickName", "nick_name", ""),
)
ATTRIBUTE_FIELDS = [attribute.field for attribute in ATTRIBUTES]


def user_columns(sources) -> list[str]:
    """The users frame's columns for these mapped sources: USER_COLUMNS, then each other source once.

    A sub-property ("onPremisesExtensionAttributes.extensionAttribute3") is a column of its own;
    the frame holds one text value per source (a list's first value), as guardsync.graph reads it.
    """
    return USER_COLUMNS + sorted(set(sources) - set(USER_COLUMNS))


def select_names(columns) -> list[str]:
    """What Graph's $select names for these columns: a sub-property is read through its parent."""
    return list(dict.fromkeys(column.partition(".")[0] for column in columns))


@dataclass
class Snapshot:
    """What one read of the tenant returned."""

    tenant_id: str
    organization: str
    users: pd.DataFrame  # user_columns(mapped sources): USER_COLUMNS, then one text column per other source
    groups: pd.DataFrame  # GROUP_COLUMNS
    edges: pd.DataFrame  # EDGE_COLUMNS; member_type: user, group, device, servicePrincipal, orgContact
    verified_domains: list[str]
    initial_domain: str | None


@dataclass(frozen=True)
class DesiredUser:
    """A user as Atlassian should hold it. external_id is the Entra object id."""

    external_id: str
    user_name: str
    display_name: str
    given_name: str
    family_name: str
    title: str
    active: bool
    # Added with [attributes]; records stored before them load with "" (see state.load).
    preferred_language: str = ""
    timezone: str = ""
    nick_name: str = ""
    department: str = ""
    organization: str = ""
    phone_work: str = ""
    phone_mobile: str = ""

    def digest(self) -> str:
        return content_digest(asdict(self))


@dataclass(frozen=True)
class DesiredGroup:
    """A group as Atlassian should hold it; members are user external ids."""

    external_id: str
    display_name: str
    members: frozenset[str] = field(default_factory=frozenset)


@dataclass
class DesiredState:
    """Output of scope: what Atlassian should look like, and who was set aside."""

    users: dict[str, DesiredUser]  # by external_id
    groups: dict[str, DesiredGroup]  # by external_id
    excluded: dict[str, int]  # reason -> count (guest, domain, disabled_not_synced)
    quarantined: pd.DataFrame  # columns: id, identifier, rule
    identifier: str  # "upn" or "email": SSO must use the same


def text_frame(data: dict[str, list] | pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """A frame of Graph text columns (booleans aside) typed as a read with rows types it, empty or not.

    pandas types an empty list float64, and every later merge on it (str against float64) and
    `.str` on it then fail: an emptied tenant would crash the run instead of meeting the guards.
    """
    frame = pd.DataFrame(data, columns=columns)
    if frame.empty:
        frame = frame.astype({c: "str" for c in columns if frame[c].dtype != bool})
    return frame


def account_name(record: DesiredUser) -> str:
    """The userName an account holds: a record observed in Atlassian whose email differs from its
    userName carries both, as `userName <email>` (guardsync.observe), so that it differs from any desired one."""
    return record.user_name.partition(" <")[0]


def own_name(record: DesiredUser) -> DesiredUser:
    """A record fit to write back to its account: an observed record's `userName <email>` (see account_name)
    is Atlassian's reading, never a userName; the account's own userName is, and its email follows it."""
    return replace(record, user_name=account_name(record))


def name_key(value: str) -> str:
    """What makes two identifiers or names the same: letter case and Unicode normalisation aside
    (é typed as one code point or as e + accent is one name to a person, and to Atlassian).
    The scalar twin of guardsync.scope.identity_key."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).casefold())


def content_digest(record: dict) -> str:
    """Stable short hash of a JSON-able record: the plan compares these, not fields."""
    raw = json.dumps(record, sort_keys=True, default=sorted, ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not checked: an item it depends on failed


@dataclass(frozen=True)
class CheckResult:
    """One line of `guardsync check`: what a probe of one prerequisite found, and on FAIL the fix."""

    item: str  # one of guardsync.check.ITEMS
    status: Status
    detail: str  # what was found, for a person
    fix: str = ""  # what to do, on FAIL

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    @classmethod
    def ok(cls, item: str, detail: str) -> CheckResult:
        return cls(item, Status.PASS, detail)

    @classmethod
    def fail(cls, item: str, detail: str, fix: str) -> CheckResult:
        return cls(item, Status.FAIL, detail, fix)

    @classmethod
    def skip(cls, item: str, needs: str) -> CheckResult:
        return cls(item, Status.SKIP, f"not checked: needs {needs}")


# == the record: Atlassian as guardsync last wrote or observed it ==========================================


@dataclass(frozen=True)
class AppliedUser:
    scim_id: str
    record: DesiredUser  # exactly what was last written to Atlassian (or observed there)


@dataclass(frozen=True)
class AppliedGroup:
    scim_id: str
    display_name: str


@dataclass
class AppliedState:
    users: dict[str, AppliedUser] = field(default_factory=dict)  # by Entra id
    groups: dict[str, AppliedGroup] = field(default_factory=dict)  # by Entra id
    members: dict[str, frozenset[str]] = field(default_factory=dict)  # group id -> user ids

    def active_users(self) -> int:
        return sum(1 for user in self.users.values() if user.record.active)
