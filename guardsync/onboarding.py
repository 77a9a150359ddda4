"""Onboarding: `guardsync init` writes a configuration, `guardsync check` proves every prerequisite.

Plain functions returning typed results; the command line only prints them.

`check` writes nothing anywhere: Graph is only read, the SCIM client runs in dry-run
(its transport refuses anything but GET) and sends one `GET /Users?count=1`, and the
state store is only read (a SQLite file that does not exist yet is not even opened,
and a database without guardsync's tables is not given them).

Each check answers PASS, FAIL (with the fix) or SKIP (not checked because an item it
needs failed: fix that one first). They are independent otherwise, so one broken
prerequisite fails one line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import jwt
import pandas as pd

from guardsync.config import (SECRET_REF, Settings, SyncSettings, load_settings, parse_settings, redacted_url,
                              resolve_secret)
from guardsync.errors import AuthError, ConfigError, GuardsyncBlocked, GuardsyncError, NotFound, TransientError
from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, Snapshot

CHECK_RETRY_SECONDS = 10.0  # a preflight answers quickly: a dead endpoint fails its line, it does not hang

# What guardsync reads, and the application permissions (roles) that allow it. Broader roles count too.
_DIRECTORY = frozenset({"Directory.Read.All", "Directory.ReadWrite.All"})
REQUIRED_ROLES: list[tuple[str, frozenset[str]]] = [
    ("User.Read.All", _DIRECTORY | {"User.Read.All", "User.ReadWrite.All"}),
    ("GroupMember.Read.All (or Group.Read.All)",
     _DIRECTORY | {"GroupMember.Read.All", "Group.Read.All", "GroupMember.ReadWrite.All", "Group.ReadWrite.All"}),
    ("Domain.Read.All", _DIRECTORY | {"Domain.Read.All", "Domain.ReadWrite.All"}),
    ("Organization.Read.All", _DIRECTORY | {"Organization.Read.All", "Organization.ReadWrite.All"}),
]
PERMISSION_REASONS = {
    "User.Read.All": "read users (identifier, names, title, enabled)",
    "GroupMember.Read.All (or Group.Read.All)": "read groups and their members",
    "Domain.Read.All": "read the tenant's verified domains",
    "Organization.Read.All": "read the tenant's name and id",
}

ITEMS = ("configuration", "secrets", "token", "permissions", "tenant", "domains", "groups", "attributes", "atlassian",
         "state")


def admin_consent_url(authority_host: str, tenant_id: str, client_id: str) -> str:
    """The page where a Global/Privileged Role Administrator grants the app's permissions for the tenant."""
    return f"{authority_host.rstrip('/')}/{quote(tenant_id, safe='')}/adminconsent?client_id={quote(client_id, safe='')}"


def permission_lines(authority_host: str, tenant_id: str, client_id: str) -> list[str]:
    """What to grant in Entra, for people: the permissions, their type, and the consent URL."""
    lines = [
        "Grant the Entra application these Microsoft Graph permissions, of type Application (not Delegated),",
        f"in Entra admin center > App registrations > {client_id} > API permissions, then grant admin consent:",
    ]
    lines += [f"  - {name:<42} to {reason}" for name, reason in PERMISSION_REASONS.items()]
    lines.append(f"Admin consent for the tenant: {admin_consent_url(authority_host, tenant_id, client_id)}")
    return lines


# == check =====================================================================================


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not checked: an item it depends on failed


@dataclass(frozen=True)
class CheckResult:
    item: str  # one of ITEMS
    status: Status
    detail: str  # what was found, for a person
    fix: str = ""  # what to do, on FAIL

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS


@dataclass
class CheckReport:
    source: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def result(self, item: str) -> CheckResult:
        return next(result for result in self.results if result.item == item)

    def counts(self) -> dict[Status, int]:
        return {status: sum(1 for r in self.results if r.status is status) for status in Status}


def _pass(item: str, detail: str) -> CheckResult:
    return CheckResult(item, Status.PASS, detail)


def _fail(item: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(item, Status.FAIL, detail, fix)


def _skip(item: str, needs: str) -> CheckResult:
    return CheckResult(item, Status.SKIP, f"not checked: needs {needs}")


def run_checks(config_path: str | Path, prefect_lookup: Callable[[str], str] | None = None) -> CheckReport:
    """Every prerequisite of a sync, for the configuration file at `config_path`."""
    source = str(config_path)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        fix = f"correct {source} (or write a new one with `guardsync init`) and run guardsync check again"
        if "not found" in str(exc):
            fix = "write one with `guardsync init --output FILE`, or pass --config with the path of yours"
        results = [_fail("configuration", str(exc), fix)]
        results += [_skip(item, "a valid configuration") for item in ITEMS[1:]]
        return CheckReport(source, results)
    return check_settings(settings, source, prefect_lookup)


def check_settings(settings: Settings, source: str = "configuration",
                   prefect_lookup: Callable[[str], str] | None = None) -> CheckReport:
    """Every prerequisite of a sync for valid settings; each check guarded so one failure is one line."""
    from guardsync.graph import GraphClient

    report = CheckReport(source, [_pass("configuration", _describe_settings(settings, source))])
    secrets_result, resolved = _check_secrets(settings, prefect_lookup)
    report.results.append(secrets_result)
    entra = settings.entra

    graph = None
    if "entra" in resolved:
        graph = GraphClient(
            tenant_id=entra.tenant_id, client_id=entra.client_id, client_secret=resolved["entra"],
            certificate_path=entra.certificate_path if resolved["entra"] is None else None,
            authority_host=entra.authority_host, graph_url=entra.graph_url, max_retry_seconds=CHECK_RETRY_SECONDS,
        )
    try:
        if graph is None:
            report.results += [_skip(item, "the Entra credential (see secrets)")
                               for item in ("token", "permissions", "tenant", "domains", "groups", "attributes")]
            tenant = None
        else:
            token_result, claims = _guarded("token", lambda: _check_token(graph, settings))
            report.results.append(token_result)
            if claims is None:
                report.results += [_skip(item, "a token (see token)")
                                   for item in ("permissions", "tenant", "domains", "groups", "attributes")]
                tenant = None
            else:
                report.results.append(_guarded("permissions", lambda: (_check_roles(claims, settings), None))[0])
                tenant_result, tenant = _guarded("tenant", lambda: _check_tenant(graph))
                report.results.append(tenant_result)
                if tenant is None:
                    report.results.append(_skip("domains", "the tenant's domains (see tenant)"))
                else:
                    report.results.append(_guarded("domains", lambda: (_check_domains(tenant, settings.sync), None))[0])
                report.results.append(_guarded("groups", lambda: (_check_groups(graph, settings.sync), None))[0])
                report.results.append(_guarded("attributes", lambda: (_check_attributes(graph, settings), None))[0])
    finally:
        if graph is not None:
            graph.close()

    if "atlassian" in resolved:
        report.results.append(_guarded("atlassian", lambda: (_check_scim(settings, resolved["atlassian"]), None))[0])
    else:
        report.results.append(_skip("atlassian", "the SCIM API key (see secrets)"))
    if settings.access is not None:  # one more line, only with [access]
        if "access" in resolved:
            report.results.append(_guarded("access", lambda: (_check_access(settings, resolved["access"]), None))[0])
        else:
            report.results.append(_skip("access", "the organization API key (see secrets)"))
    if "state" in resolved:
        tenant_id = tenant.tenant_id if tenant is not None else None
        report.results.append(_guarded("state", lambda: (_check_state(resolved["state"], tenant_id, settings), None))[0])
    else:
        report.results.append(_skip("state", "the state URL (see secrets)"))
    return report


def _guarded(item: str, check: Callable[[], tuple[CheckResult, object]]) -> tuple[CheckResult, object]:
    """Run one check; an error it did not expect fails its own line (by type only: no text that might hold a secret)."""
    try:
        return check()
    except GuardsyncError as exc:
        return _fail(item, str(exc), "fix what the message names and run guardsync check again"), None
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        return _fail(item, f"unexpected {type(exc).__name__} while checking {item}",
                     "run guardsync check again; if it persists, report it with this line"), None


def _describe_settings(settings: Settings, source: str) -> str:
    sync = settings.sync
    scope = f"pilot groups {', '.join(sync.groups)}" if sync.groups else "all users and all groups"
    domains = ", ".join(sync.domains) if sync.domains else "every verified domain but the initial one"
    return (f"{source} is valid: tenant {settings.entra.tenant_id}, app {settings.entra.client_id}, {scope}; "
            f"domains: {domains}; identifier {sync.identifier}")


# -- secrets ---------------------------------------------------------------------------------


def _check_secrets(settings: Settings, prefect_lookup) -> tuple[CheckResult, dict]:
    """Resolve every reference (in memory only); `resolved` holds what could be, by client."""
    entra, problems, found, resolved = settings.entra, [], [], {}

    def value(reference: str, key: str) -> str | None:
        try:
            resolved_value = resolve_secret(reference, key, prefect_lookup)
        except ConfigError as exc:
            problems.append(str(exc))
            return None
        found.append(f"{key} ({reference})")
        return resolved_value

    if entra.client_secret is not None:
        secret = value(entra.client_secret, "entra.client_secret")
        if secret is not None:
            resolved["entra"] = secret
    else:
        from guardsync.graph import _certificate_credential  # the client's own reading of the PEM file

        try:
            _certificate_credential(entra.certificate_path)
            resolved["entra"] = None  # GraphClient reads the file itself
            found.append(f"entra.certificate_path ({entra.certificate_path})")
        except ConfigError as exc:
            problems.append(str(exc))
    api_key = value(settings.atlassian.api_key, "atlassian.api_key")
    if api_key is not None:
        resolved["atlassian"] = api_key
    if settings.access is not None:
        org_key = value(settings.access.api_key, "access.api_key")
        if org_key is not None:
            resolved["access"] = org_key
    state = settings.sync.state
    if state.startswith(("env:", "prefect:")):
        state = value(state, "sync.state")
    if state is not None:
        resolved["state"] = state
    if problems:
        fix = ("set each variable named above in the environment guardsync runs in (the shell, the Prefect work "
               "pool or the deployment's job variables), or create the Prefect Secret block; never put the secret "
               "in the file")
        return _fail("secrets", "; ".join(problems), fix), resolved
    return _pass("secrets", "resolved: " + ", ".join(found)), resolved


# -- Entra and Graph ----------------------------------------------------------------------------


def _check_token(graph, settings: Settings) -> tuple[CheckResult, dict | None]:
    entra = settings.entra
    try:
        token = graph._access_token()  # the client's own msal path: same retries and AADSTS advice as a run
    except AuthError as exc:
        where = (f"the secret in {entra.client_secret}" if entra.client_secret
                 else f"the certificate {entra.certificate_path}")
        return _fail("token", str(exc), f"check entra.tenant_id and entra.client_id, and that {where} belongs to "
                     f"app {entra.client_id} (Entra admin center > App registrations > Certificates & secrets); "
                     "a new secret must replace the old one where the reference points"), None
    except TransientError as exc:
        return _fail("token", str(exc), f"check that {entra.authority_host} is reachable from here (proxy: HTTPS_PROXY; "
                     "private CA: REQUESTS_CA_BUNDLE) and run guardsync check again"), None
    except ConfigError as exc:
        return _fail("token", str(exc), "correct the [entra] settings named above"), None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})  # guardsync is not the audience: read only
    except jwt.PyJWTError:
        claims = {}
    valid_until = ""
    if isinstance(claims.get("exp"), (int, float)):
        valid_until = f", valid until {datetime.fromtimestamp(claims['exp'], timezone.utc):%H:%M} UTC"
    detail = (f"Entra at {entra.authority_host} issued an app token to {claims.get('appid', entra.client_id)} "
              f"for tenant {claims.get('tid', entra.tenant_id)}{valid_until}")
    return _pass("token", detail), claims


def _check_roles(claims: dict, settings: Settings) -> CheckResult:
    entra = settings.entra
    consent = admin_consent_url(entra.authority_host, entra.tenant_id, entra.client_id)
    if not claims:
        return _fail("permissions", "the access token is not a JWT, so its application roles cannot be read",
                     f"check in Entra admin center > App registrations > {entra.client_id} > API permissions that "
                     f"the app has {', '.join(PERMISSION_REASONS)} (Application) with admin consent: {consent}")
    roles = set(claims.get("roles") or [])
    missing = [name for name, accepted in REQUIRED_ROLES if not roles & accepted]
    granted = ", ".join(sorted(roles)) or "none"
    if missing:
        return _fail(
            "permissions", f"the token lacks the application permission(s) {', '.join(missing)} (granted: {granted})",
            f"in Entra admin center > App registrations > {entra.client_id} > API permissions, add Microsoft Graph > "
            f"Application permissions > {', '.join(missing)}, then grant admin consent ({consent}); "
            "tokens issued after the consent carry them",
        )
    return _pass("permissions", f"the token carries the application roles {granted}")


@dataclass(frozen=True)
class TenantInfo:
    tenant_id: str
    organization: str
    verified_domains: list[str]
    initial_domain: str | None


def _check_tenant(graph) -> tuple[CheckResult, TenantInfo | None]:
    try:
        organization = graph.read_all("/organization", {"$select": "id,displayName"})[0]
        domains = graph.read_all("/domains", {"$select": "id,isVerified,isInitial,isDefault"})
    except (AuthError, NotFound) as exc:
        return _fail("tenant", str(exc), "grant the permission the message names (Application type) with admin "
                     "consent, or check entra.graph_url"), None
    except TransientError as exc:
        return _fail("tenant", str(exc), "check that Microsoft Graph is reachable from here and run guardsync check again"), None
    tenant = TenantInfo(
        tenant_id=organization["id"],
        organization=organization.get("displayName") or "",
        verified_domains=[d["id"] for d in domains if d.get("isVerified")],
        initial_domain=next((d["id"] for d in domains if d.get("isInitial")), None),
    )
    detail = (f"{tenant.organization or '(no name)'} ({tenant.tenant_id}); verified domains: "
              f"{', '.join(tenant.verified_domains) or 'none'}; make sure this is the tenant you mean to sync")
    return _pass("tenant", detail), tenant


def _domains_snapshot(tenant: TenantInfo) -> Snapshot:
    """A Snapshot holding only the tenant and its domains: what scope.allowed_domains reads."""
    return Snapshot(
        tenant_id=tenant.tenant_id, organization=tenant.organization,
        users=pd.DataFrame(columns=USER_COLUMNS), groups=pd.DataFrame(columns=GROUP_COLUMNS),
        edges=pd.DataFrame(columns=EDGE_COLUMNS),
        verified_domains=tenant.verified_domains, initial_domain=tenant.initial_domain,
    )


def _check_domains(tenant: TenantInfo, sync: SyncSettings) -> CheckResult:
    from guardsync.scope import allowed_domains

    try:
        allowed = allowed_domains(_domains_snapshot(tenant), sync.domains)
    except ConfigError as exc:
        verified = {d.casefold() for d in tenant.verified_domains}
        unverified = [d for d in sync.domains if d.casefold() not in verified]
        return _fail("domains", str(exc), f"verify {', '.join(unverified)} in Entra admin center > Settings > Domain "
                     "names, or remove it from [sync] domains")
    if not allowed:
        return _fail("domains", "the tenant has no verified domain besides its initial *.onmicrosoft.com domain, "
                     "which Atlassian cannot verify", "add and verify your organization's domain in Entra (Domain "
                     "names) and in Atlassian Administration (Domains)")
    how = "configured in [sync] domains, each verified in Entra" if sync.domains else "every verified domain but the initial one"
    return _pass("domains", f"{', '.join(allowed)} ({how}); Atlassian must have verified them too (Administration > Domains)")


def _check_groups(graph, sync: SyncSettings) -> CheckResult:
    """Each named group exists once; each synced group's in-scope size is within max_group_size.

    The sizes come from the run's own code (extract, flatten, scope), counted before the
    users gate's quarantine, so they are at most a few users above what a run counts.
    """
    from guardsync.flatten import effective_memberships
    from guardsync.scope import allowed_domains, desired_groups, desired_users, scope, select_groups

    try:
        snapshot = graph.extract()
    except (AuthError, NotFound) as exc:
        return _fail("groups", str(exc), "grant the permission the message names (Application type) with admin consent")
    except TransientError as exc:
        return _fail("groups", str(exc), "check that Microsoft Graph is reachable from here and run guardsync check again")

    problems, fixes, found = [], [], []
    for name in sync.groups:
        try:
            found.append(select_groups(snapshot.groups, [name])["id"].iloc[0])
        except ConfigError as exc:
            problems.append(str(exc).removeprefix("[sync] groups: "))
    if problems:
        fixes.append("correct [sync] groups: the display name as Entra shows it (any letter case), or the object id "
                     "of the group meant")
    if sync.groups and not found:
        return _fail("groups", "; ".join(problems), "; ".join(fixes))

    # Sizes over the configured domains that are verified (the domains check reports the others).
    try:
        allowed_domains(snapshot, sync.domains)
        domains = sync.domains
    except ConfigError:
        verified = {d.casefold() for d in snapshot.verified_domains}
        domains = [d for d in sync.domains if d.casefold() in verified]
    sizing = sync.model_copy(update={"groups": found, "domains": domains})
    scoped = scope(snapshot, effective_memberships(snapshot.edges, snapshot.groups["id"]), sizing)
    users = desired_users(scoped.users, frozenset())
    groups = desired_groups(scoped.groups, scoped.memberships, users)
    sizes = sorted(((len(g.members), g.display_name) for g in groups.values()), key=lambda pair: (-pair[0], pair[1]))
    too_large = [(size, name) for size, name in sizes if size > sync.max_group_size]
    if too_large:
        problems.append(", ".join(f"{name} has {size} users in scope" for size, name in too_large[:10])
                        + f" (more than [sync] max_group_size {sync.max_group_size}; a run would be blocked)")
        fixes.append(f"split {', '.join(name for _, name in too_large[:10])} into smaller groups in Entra and sync "
                     "those, or raise [sync] max_group_size if Atlassian's limits allow it")
    if problems:
        sized = ", ".join(f"{name} ({size} users)" for size, name in sizes[:10] if size <= sync.max_group_size)
        within = f"; within the limit: {sized}" if sync.groups and sized else ""
        return _fail("groups", "; ".join(problems) + within, "; ".join(fixes))
    active = sum(1 for user in users.values() if user.active)
    if sync.groups:
        shown = ", ".join(f"{name} ({size} users)" for size, name in sizes)
        return _pass("groups", f"{shown} in scope, each within max_group_size {sync.max_group_size}; "
                     f"{active} enabled users in scope")
    largest = ", ".join(f"{name} ({size})" for size, name in sizes[:3]) or "none"
    return _pass("groups", f"all {len(sizes)} groups, each within max_group_size {sync.max_group_size} "
                 f"(largest: {largest}); {active} enabled users in scope")


def _check_attributes(graph, settings: Settings) -> CheckResult:
    """Graph returns every mapped source in a user list (what runs read), and the app may read it.

    One page of one user with the run's $select; when Graph refuses it, each source alone, so
    the line names every source at fault."""
    from guardsync.models import select_names, user_columns

    mapping = settings.attributes.mapping()
    columns = user_columns(settings.attributes.sources())
    if _probe(graph, columns) is None:
        shown = ", ".join(f"{settings.attributes.key_of(field)} = {source}" for field, source in mapping.items())
        return _pass("attributes", f"Graph returns every mapped source in user lists: {shown}")
    problems, fixes = [], set()
    for field, source in mapping.items():
        failure = _probe(graph, [*USER_COLUMNS[:1], source])
        if failure is None:
            continue
        key = settings.attributes.key_of(field)
        problems.append(f"[attributes] {key} = {source!r}: {failure[0]}")
        fixes.add(failure[1])
    if not problems:  # only together (unlikely): report what Graph said of the whole selection
        failure = _probe(graph, columns)
        problems, fixes = [f"$select={','.join(select_names(columns))}: {failure[0]}"], {failure[1]}
    return _fail("attributes", "; ".join(problems), "; ".join(sorted(fixes)))


def _probe(graph, columns: list[str]) -> tuple[str, str] | None:
    """None if Graph lists a user with these columns selected, else (what went wrong, the fix)."""
    from guardsync.models import select_names

    try:
        graph.get("/users", {"$select": ",".join(select_names(columns)), "$top": 1}, page=True)
    except ConfigError:  # the client's reading of Graph's 400 for an unknown property
        return ("Microsoft Graph has no such user property",
                "correct the source: a Graph user property as $select names it (Graph Explorer lists them), "
                "onPremisesExtensionAttributes.extensionAttribute1..15, or extension_<appId>_<name> of a directory "
                "extension registered in the tenant (GET /applications/{id}/extensionProperties), or \"\" to turn it off")
    except AuthError:
        return ("the app may not read it",
                f"grant app {graph.client_id} the application permission that property needs (its Graph "
                "reference names it) with admin consent, or map another property")
    except GuardsyncError as exc:
        return (f"Microsoft Graph does not return it when listing users ({exc})",
                "map a property Graph returns in user lists and delta queries (some, such as aboutMe or "
                "preferredName, only come with a single user's read)")
    return None


# -- Atlassian SCIM -------------------------------------------------------------------------------


def _check_scim(settings: Settings, api_key: str) -> CheckResult:
    from guardsync.scim import ScimClient

    url, reference = settings.atlassian.scim_url, settings.atlassian.api_key
    scim = ScimClient(url, api_key, dry_run=True, max_retry_seconds=CHECK_RETRY_SECONDS)  # dry-run: GET only
    try:
        page = scim._call("GET", "/Users", params={"startIndex": 1, "count": 1})
    except AuthError as exc:
        return _fail("atlassian", str(exc), "in Atlassian Administration > Security > Identity providers > your "
                     f"directory, regenerate the API key and store it where atlassian.api_key points ({reference})")
    except NotFound as exc:
        return _fail("atlassian", str(exc), "copy the directory's SCIM base URL from Atlassian Administration > "
                     "Security > Identity providers > your directory into atlassian.scim_url")
    except TransientError as exc:
        return _fail("atlassian", str(exc), f"check that {url} is reachable from here (proxy: HTTPS_PROXY; private "
                     "CA: REQUESTS_CA_BUNDLE) and run guardsync check again")
    except GuardsyncError as exc:
        return _fail("atlassian", str(exc), "check atlassian.scim_url: it is the directory's SCIM base URL, "
                     "https://api.atlassian.com/scim/directory/DIRECTORY_ID")
    total = page.get("totalResults", "?") if isinstance(page, dict) else "?"
    return _pass("atlassian", f"{url} answers and accepts the API key; the directory holds {total} users")


# -- product access (Organizations REST API) ------------------------------------------------------


def _check_access(settings: Settings, api_key: str) -> CheckResult:
    """The organization key is accepted, the org id is right, the SCIM directory is the org's, every product resolves."""
    from guardsync.access import resolve_products
    from guardsync.admin import AdminClient, directory_id_of

    access = settings.access
    directory = directory_id_of(settings.atlassian.scim_url)
    admin = AdminClient(access.admin_url, access.org_id, directory, api_key, dry_run=True,  # dry-run: reads only
                        max_retry_seconds=CHECK_RETRY_SECONDS)
    try:
        organization = admin.organization()
    except AuthError as exc:
        return _fail("access", str(exc), "in Atlassian Administration > Settings > API keys, create an organization "
                     f"API key and store it where access.api_key points ({access.api_key})")
    except NotFound as exc:
        return _fail("access", f"the organization API key does not reach organization {access.org_id} ({exc})",
                     "copy the organization id from the Atlassian Administration URL (admin.atlassian.com/o/ORG_ID) "
                     "into [access] org_id, and use a key of that organization")
    name = (organization.get("attributes") or {}).get("name") or access.org_id
    if directory not in admin.directory_ids():
        return _fail("access", f"the SCIM directory {directory} (from atlassian.scim_url) is not a directory of "
                     f"organization {name} ({access.org_id})", "use the organization that holds the SCIM directory, or "
                     "the SCIM URL of a directory of this organization")
    workspaces = admin.workspaces()
    references = sorted({p for products in access.groups.values() for p in products})
    try:
        resolved = resolve_products(references, workspaces)
    except ConfigError as exc:
        return _fail("access", str(exc), "correct the product in [access.groups]: a product key the organization has, "
                     "as key@site-host where it has the product on several sites")
    products = ", ".join(f"{ref} = {w.label}" for ref, w in resolved.items()) or "none configured yet"
    return _pass("access", f"organization {name} ({access.org_id}) accepts the organization API key; directory "
                 f"{directory} is one of its directories; products: {products}")


# -- state store ---------------------------------------------------------------------------------


def _check_state(url: str, tenant_id: str | None, settings: Settings) -> CheckResult:
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from guardsync.state import StateStore

    scim_url = settings.atlassian.scim_url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return _fail("state", "[sync] state is not a SQLAlchemy URL",
                     "give one such as sqlite:///guardsync-state.db or postgresql+psycopg://user@host/db")
    shown = redacted_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            return _fail("state", f"{shown} is an in-memory database: nothing would survive a run",
                         "give a file, e.g. sqlite:///guardsync-state.db, or a PostgreSQL URL")
        path = Path(database).expanduser()
        if not path.exists():  # opening it would create it: say what the first sync will do instead
            parent = path.absolute().parent
            if not parent.is_dir():
                return _fail("state", f"{shown}: the directory {parent} does not exist",
                             f"create {parent}, or point [sync] state at a file in an existing directory")
            if not os.access(parent, os.W_OK):
                return _fail("state", f"{shown}: the directory {parent} is not writable",
                             f"let this user write to {parent}, or point [sync] state elsewhere")
            return _pass("state", f"{shown} is empty (not created yet); the first sync creates it and binds it "
                         "to this tenant and directory")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            has_tables = inspect(connection).has_table("binding")
    except (SQLAlchemyError, ImportError) as exc:
        return _fail("state", f"cannot open {shown} ({type(exc).__name__})",
                     "check that the database is up and reachable from here, and the URL, user and password")
    finally:
        engine.dispose()
    if not has_tables:
        return _pass("state", f"{shown} is reachable and empty; the first sync binds it to this tenant and directory")
    store = StateStore(url)  # its tables exist: opening it creates nothing
    try:
        bound = store.binding()
        if not bound:
            return _pass("state", f"{shown} is reachable and not bound yet; the first sync binds it")
        try:
            store.check_binding(tenant_id or bound.get("tenant_id", ""), scim_url)
        except GuardsyncBlocked as exc:
            return _fail("state", str(exc), "point [sync] state at this tenant and directory's own store (a new "
                         "SQLite file or database); one store serves one tenant and one SCIM directory")
        last = store.history(1)
        runs = f"; last run {last[0]['started_at']:%Y-%m-%d %H:%M} {last[0]['status']}" if last else ""
        compared = "" if tenant_id else " (tenant not compared: it could not be read)"
        return _pass("state", f"{shown} is bound to tenant {bound.get('tenant_id')} and this directory{compared}{runs}")
    finally:
        store.dispose()


# == init ========================================================================================

REQUIRED_ANSWERS = {
    "tenant_id": "--tenant-id",
    "client_id": "--client-id",
    "credential": "--client-secret-ref or --certificate-path",
    "scim_url": "--scim-url",
    "api_key_ref": "--api-key-ref",
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Ask = Callable[[str, str], str]  # (question, default) -> answer ("" takes the default)


@dataclass
class InitAnswers:
    """What `guardsync init` writes; None means "not given" (asked on a terminal, else defaulted or refused)."""

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret_ref: str | None = None
    certificate_path: str | None = None
    scim_url: str | None = None
    api_key_ref: str | None = None
    groups: list[str] | None = None
    domains: list[str] | None = None
    identifier: str | None = None
    state: str | None = None
    authority_host: str | None = None
    graph_url: str | None = None


def check_secret_reference(value: str, what: str) -> str:
    """A reference (env:NAME, prefect:BLOCK) or a ConfigError; the value is never echoed (it may be a pasted secret)."""
    value = value.strip()
    scheme, _, name = value.partition(":")
    if not SECRET_REF.match(value) or (scheme == "env" and not ENV_NAME.match(name)):
        raise ConfigError(
            f"{what} must be a reference, env:VARIABLE or prefect:SECRET_BLOCK, not the secret itself (it was not "
            "written anywhere): put the secret in an environment variable or a Prefect Secret block and give its name"
        )
    return value


def complete_answers(answers: InitAnswers, ask: Ask | None = None, default_state: str | None = None) -> InitAnswers:
    """Fill what is missing: by asking when `ask` is given (a terminal), else refuse missing required values."""
    if answers.client_secret_ref is not None and answers.certificate_path is not None:
        raise ConfigError("give either --client-secret-ref or --certificate-path, not both")
    if answers.client_secret_ref is not None:
        answers.client_secret_ref = check_secret_reference(answers.client_secret_ref, "--client-secret-ref")
    if answers.api_key_ref is not None:
        answers.api_key_ref = check_secret_reference(answers.api_key_ref, "--api-key-ref")
    if ask is None:
        missing = [flag for key, flag in REQUIRED_ANSWERS.items() if _missing(answers, key)]
        if missing:
            raise ConfigError(f"guardsync init: missing {', '.join(missing)}; pass them, or run init in a terminal "
                              "to be asked")
    else:
        _ask_missing(answers, ask, default_state)
    answers.groups = answers.groups or []
    answers.domains = answers.domains or []
    answers.identifier = answers.identifier or "upn"
    answers.state = answers.state or default_state or SyncSettings.model_fields["state"].default
    return answers


def _missing(answers: InitAnswers, key: str) -> bool:
    if key == "credential":
        return answers.client_secret_ref is None and answers.certificate_path is None
    return not getattr(answers, key)


def _ask_missing(answers: InitAnswers, ask: Ask, default_state: str | None) -> None:
    def required(question: str, default: str = "") -> str:
        for _ in range(5):
            answer = ask(question, default).strip() or default
            if answer:
                return answer
        raise ConfigError(f"guardsync init: no answer for {question!r}")

    def reference(question: str, default: str, what: str) -> str:
        for _ in range(5):
            try:
                return check_secret_reference(ask(question, default).strip() or default, what)
            except ConfigError as exc:
                print(f"  {exc}")
        raise ConfigError(f"guardsync init: {what} must be a reference, env:VARIABLE or prefect:SECRET_BLOCK")

    if not answers.tenant_id:
        answers.tenant_id = required("Entra tenant id (GUID or contoso.onmicrosoft.com)")
    if not answers.client_id:
        answers.client_id = required("Application (client) id of the app registration")
    if answers.client_secret_ref is None and answers.certificate_path is None:
        kind = ""
        while kind not in ("secret", "certificate"):
            kind = required("Credential: secret or certificate", "secret").casefold()
        if kind == "secret":
            answers.client_secret_ref = reference(
                "Where the client secret is (env:VARIABLE or prefect:SECRET_BLOCK; not the secret)",
                "env:ENTRA_CLIENT_SECRET", "the client secret reference")
        else:
            answers.certificate_path = required("Path of the PEM file with the private key and certificate", "app.pem")
    if not answers.scim_url:
        answers.scim_url = required("Atlassian SCIM directory URL", "https://api.atlassian.com/scim/directory/DIRECTORY_ID")
    if not answers.api_key_ref:
        answers.api_key_ref = reference("Where the SCIM API key is (env:VARIABLE or prefect:SECRET_BLOCK; not the key)",
                                        "env:ATLASSIAN_SCIM_API_KEY", "the API key reference")
    if answers.groups is None:
        answer = ask("Pilot groups, comma-separated display names (empty: all users and all groups)", "")
        answers.groups = [g.strip() for g in answer.split(",") if g.strip()]
    if answers.domains is None:
        answer = ask("Domains to sync, comma-separated (empty: every verified domain but *.onmicrosoft.com)", "")
        answers.domains = [d.strip() for d in answer.split(",") if d.strip()]
    while answers.identifier not in ("upn", "email"):
        answers.identifier = (ask("Identifier: upn (userPrincipalName) or email (mail)", "upn").strip() or "upn").casefold()
    if not answers.state:
        answers.state = required("State store (SQLAlchemy URL)", default_state or SyncSettings.model_fields["state"].default)


def render_config(answers: InitAnswers) -> str:
    """The commented TOML file; every key of the contract, optional ones commented out with their defaults."""
    fields = SyncSettings.model_fields
    authority = answers.authority_host or "https://login.microsoftonline.com"
    graph = answers.graph_url or "https://graph.microsoft.com"
    if answers.client_secret_ref is not None:
        credential = [
            "# Where the client secret is: env:VARIABLE (an environment variable) or prefect:BLOCK (a Prefect Secret",
            "# block). Never the secret itself.",
            f"client_secret = {_toml(answers.client_secret_ref)}",
            "# Or a certificate instead (one PEM file holding the private key and the certificate):",
            '# certificate_path = "app.pem"',
        ]
    else:
        credential = [
            "# One PEM file holding the private key and the certificate uploaded to the app registration.",
            f"certificate_path = {_toml(answers.certificate_path)}",
            "# Or a client secret instead, by reference (env:VARIABLE or prefect:SECRET_BLOCK):",
            '# client_secret = "env:ENTRA_CLIENT_SECRET"',
        ]
    lines = [
        f"# guardsync configuration, written by `guardsync init` on {datetime.now(timezone.utc):%Y-%m-%d}.",
        "# Check every prerequisite before the first sync:  guardsync check --config THIS_FILE",
        "# Secrets are references (env:VARIABLE or prefect:SECRET_BLOCK), resolved in memory when guardsync runs.",
        "",
        "[entra]",
        "# The Entra ID tenant: its GUID or its *.onmicrosoft.com domain.",
        f"tenant_id = {_toml(answers.tenant_id)}",
        "# Application (client) id of the app registration guardsync signs in as (application permissions,",
        "# admin consent: see `guardsync init` output or the README).",
        f"client_id = {_toml(answers.client_id)}",
        *credential,
        "# Sovereign clouds sign in and read Graph elsewhere (e.g. https://login.microsoftonline.us and",
        "# https://graph.microsoft.us).",
        f"authority_host = {_toml(authority)}",
        f"graph_url = {_toml(graph)}",
        "",
        "[atlassian]",
        "# Atlassian Administration > Security > Identity providers > your directory: the SCIM base URL and API key.",
        f"scim_url = {_toml(answers.scim_url)}",
        f"api_key = {_toml(answers.api_key_ref)}",
        "",
        "[sync]",
        "# Groups to sync: display names (any letter case) or object ids. Start with one pilot group;",
        "# [] syncs all users and all groups. Nested groups are flattened into each synced group.",
        f"groups = {_toml(answers.groups)}",
        "# Allowed domains: [] = every verified domain of the tenant but its initial *.onmicrosoft.com one.",
        f"domains = {_toml(answers.domains)}",
        '# "upn" (userPrincipalName) or "email" (mail). SSO in Atlassian must use the same identifier.',
        f"identifier = {_toml(answers.identifier)}",
        "# What guardsync applied, and the audit of every write (SQLAlchemy URL; PostgreSQL for shared deployments).",
        f"state = {_toml(answers.state)}",
        "# Optional, shown with their defaults:",
        f"# max_group_size = {fields['max_group_size'].default}      # a synced group with more members blocks the run",
        f"# max_deactivations = {_toml(fields['max_deactivations'].default)}   # a count, or a percentage of the active users guardsync manages",
        f"# write_concurrency = {fields['write_concurrency'].default}       # parallel SCIM writes",
        f"# full_read_every_hours = {fields['full_read_every_hours'].default:g}  # delta sync: a full read at least this often",
        "",
        "# Optional: Atlassian attribute = Entra user property. Left out, guardsync sends what Atlassian's own",
        "# Entra sync sends (names, title, preferredLanguage, work and mobile phone, department); \"\" sends nothing.",
        "# [attributes]",
        '# organization = "companyName"',
        '# nickName = "onPremisesExtensionAttributes.extensionAttribute3"',
        '# "phoneNumbers.mobile" = ""',
        "",
        "# Optional: product access for synced groups, through the Organizations REST API (README, rollout step 8).",
        "# Without it guardsync changes no product access, and each run's summary lists the groups that need it.",
        "# [access]",
        '# org_id = "ORG_ID"                        # from the Atlassian Administration URL: admin.atlassian.com/o/ORG_ID',
        '# api_key = "env:ATLASSIAN_ORG_API_KEY"    # an organization API key (Settings > API keys), not the SCIM key',
        "# max_revocations = 0                      # grants one run may take away; more blocks the run",
        "# [access.groups]                          # synced group (display name or Entra object id) = its products",
        '# "Engineering All" = ["jira-software", "confluence"]',
        "",
    ]
    return "\n".join(lines)


def _toml(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    text = str(value)
    escaped = "".join(
        "\\\\" if ch == "\\" else '\\"' if ch == '"' else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )
    return f'"{escaped}"'


@dataclass
class InitResult:
    path: Path
    settings: Settings
    next_steps: list[str]


def write_config(answers: InitAnswers, output: str | Path, force: bool = False) -> InitResult:
    """Validate the rendered file as `load_settings` will read it, then write it (never over a file without force)."""
    path = Path(output)
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists: pass --force to replace it, or --output another file")
    text = render_config(answers)
    try:
        settings = parse_settings(tomllib.loads(text), source=str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"guardsync init produced invalid TOML ({exc}): report this") from None
    with path.open("w" if force else "x", encoding="utf-8") as handle:
        handle.write(text)
    return InitResult(path, settings, next_steps(settings, path))


def next_steps(settings: Settings, path: Path) -> list[str]:
    entra = settings.entra
    lines = [f"Wrote {path}.", ""]
    lines += permission_lines(entra.authority_host, entra.tenant_id, entra.client_id)
    exports = [ref.partition(":")[2] for ref in (entra.client_secret, settings.atlassian.api_key)
               if ref and ref.startswith("env:")]
    blocks = [ref.partition(":")[2] for ref in (entra.client_secret, settings.atlassian.api_key)
              if ref and ref.startswith("prefect:")]
    lines.append("")
    if exports:
        lines.append("Set the secrets where guardsync runs (never in the file): " + ", ".join(f"{name}=..." for name in exports))
    if blocks:
        lines.append("Create the Prefect Secret blocks: " + ", ".join(blocks))
    if not settings.sync.groups:
        lines.append("No pilot group: this configuration syncs ALL users and groups; for a pilot, set [sync] groups.")
    lines.append(f"Then: guardsync check --config {path}   and   guardsync plan --config {path}")
    return lines
