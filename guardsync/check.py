"""`guardsync check`: every prerequisite of a sync, one PASS, FAIL (with the fix) or SKIP line each.

`check` writes nothing anywhere: Graph is only read, the SCIM and Organizations API clients
run in dry-run (their transports refuse writes) and the SCIM one sends one
`GET /Users?count=1`, and the state store is only read (a SQLite file that does not exist
yet is not even opened, and a database without guardsync's tables is not given them).

The probes live with the clients they probe (guardsync.graph, .scim, .admin, .state): each
asks what a run will ask and turns the client's errors into one FAIL line with its fix.
Here: the order, what each line needs (SKIP: not checked because an item it needs failed,
fix that one first), the secrets, and what the configured scope and products make of the
answers. The lines are independent otherwise, so one broken prerequisite fails one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from guardsync.access import resolve_products
from guardsync.admin import AdminClient, check_organization, directory_id_of
from guardsync.config import Settings, SyncSettings, load_settings, resolve_secret
from guardsync.errors import ConfigError, GuardsyncError
from guardsync.flatten import effective_memberships
from guardsync.graph import (GraphClient, certificate_credential, check_attributes, check_permissions, check_tenant,
                             check_token, read_tenant)
from guardsync.models import CheckResult, Snapshot, Status
from guardsync.scim import ScimClient, check_directory
from guardsync.scope import allowed_domains, desired_groups, desired_users, scope, select_groups
from guardsync.state import check_store

CHECK_RETRY_SECONDS = 10.0  # a preflight answers quickly: a dead endpoint fails its line, it does not hang

ITEMS = ("configuration", "secrets", "token", "permissions", "tenant", "domains", "groups", "attributes", "atlassian",
         "state")
GRAPH_ITEMS = ("token", "permissions", "tenant", "domains", "groups", "attributes")


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


def run_checks(config_path: str | Path, prefect_lookup: Callable[[str], str] | None = None) -> CheckReport:
    """Every prerequisite of a sync, for the configuration file at `config_path`."""
    source = str(config_path)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        fix = f"correct {source} (or write a new one with `guardsync init`) and run guardsync check again"
        if "not found" in str(exc):
            fix = "write one with `guardsync init --output FILE`, or pass --config with the path of yours"
        results = [CheckResult.fail("configuration", str(exc), fix)]
        results += [CheckResult.skip(item, "a valid configuration") for item in ITEMS[1:]]
        return CheckReport(source, results)
    return check_settings(settings, source, prefect_lookup)


def check_settings(settings: Settings, source: str = "configuration",
                   prefect_lookup: Callable[[str], str] | None = None) -> CheckReport:
    """Every prerequisite of a sync for valid settings; each check guarded so one failure is one line."""
    report = CheckReport(source, [CheckResult.ok("configuration", _describe_settings(settings, source))])
    secrets_result, resolved = _check_secrets(settings, prefect_lookup)
    report.results.append(secrets_result)
    entra = settings.entra

    tenant = None
    if "entra" in resolved:
        with GraphClient(
            tenant_id=entra.tenant_id, client_id=entra.client_id, client_secret=resolved["entra"],
            certificate_path=entra.certificate_path if resolved["entra"] is None else None,
            authority_host=entra.authority_host, graph_url=entra.graph_url, max_retry_seconds=CHECK_RETRY_SECONDS,
        ) as graph:
            tenant = _check_graph(report, graph, settings)
    else:
        report.results += [CheckResult.skip(item, "the Entra credential (see secrets)") for item in GRAPH_ITEMS]

    if "atlassian" in resolved:
        report.results.append(_guarded("atlassian", lambda: (_check_scim(settings, resolved["atlassian"]), None))[0])
    else:
        report.results.append(CheckResult.skip("atlassian", "the SCIM API key (see secrets)"))
    if settings.access is not None:  # one more line, only with [access]
        if "access" in resolved:
            report.results.append(_guarded("access", lambda: (_check_access(settings, resolved["access"]), None))[0])
        else:
            report.results.append(CheckResult.skip("access", "the organization API key (see secrets)"))
    if "state" in resolved:
        tenant_id = tenant.tenant_id if tenant is not None else None
        report.results.append(_guarded(
            "state", lambda: (check_store(resolved["state"], tenant_id, settings.atlassian.scim_url), None))[0])
    else:
        report.results.append(CheckResult.skip("state", "the state URL (see secrets)"))
    return report


def _check_graph(report: CheckReport, graph: GraphClient, settings: Settings) -> Snapshot | None:
    """The Entra and Graph lines (GRAPH_ITEMS); the tenant, when Graph returned it."""
    token_result, claims = _guarded("token", lambda: check_token(graph, settings.entra))
    report.results.append(token_result)
    if claims is None:
        report.results += [CheckResult.skip(item, "a token (see token)") for item in GRAPH_ITEMS[1:]]
        return None
    report.results.append(_guarded("permissions", lambda: (check_permissions(claims, settings.entra), None))[0])
    tenant_result, tenant = _guarded("tenant", lambda: check_tenant(graph))
    report.results.append(tenant_result)
    if tenant is None:
        report.results.append(CheckResult.skip("domains", "the tenant's domains (see tenant)"))
    else:
        report.results.append(_guarded("domains", lambda: (_check_domains(tenant, settings.sync), None))[0])
    report.results.append(_guarded("groups", lambda: (_check_groups(graph, settings.sync), None))[0])
    report.results.append(_guarded("attributes", lambda: (check_attributes(graph, settings.attributes), None))[0])
    return tenant


def _guarded(item: str, check: Callable[[], tuple[CheckResult, object]]) -> tuple[CheckResult, object]:
    """Run one check; an error it did not expect fails its own line (by type only: no text that might hold a secret)."""
    try:
        return check()
    except GuardsyncError as exc:
        return CheckResult.fail(item, str(exc), "fix what the message names and run guardsync check again"), None
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        return CheckResult.fail(item, f"unexpected {type(exc).__name__} while checking {item}",
                                "run guardsync check again; if it persists, report it with this line"), None


def _describe_settings(settings: Settings, source: str) -> str:
    sync = settings.sync
    synced = f"pilot groups {', '.join(sync.groups)}" if sync.groups else "all users and all groups"
    domains = ", ".join(sync.domains) if sync.domains else "every verified domain but the initial one"
    return (f"{source} is valid: tenant {settings.entra.tenant_id}, app {settings.entra.client_id}, {synced}; "
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
        try:
            certificate_credential(entra.certificate_path)  # the client's own reading of the PEM file
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
        return CheckResult.fail("secrets", "; ".join(problems), fix), resolved
    return CheckResult.ok("secrets", "resolved: " + ", ".join(found)), resolved


# -- what the configured scope makes of the tenant -------------------------------------------------


def _check_domains(tenant: Snapshot, sync: SyncSettings) -> CheckResult:
    try:
        allowed = allowed_domains(tenant, sync.domains)
    except ConfigError as exc:
        verified = {d.casefold() for d in tenant.verified_domains}
        unverified = [d for d in sync.domains if d.casefold() not in verified]
        return CheckResult.fail("domains", str(exc), f"verify {', '.join(unverified)} in Entra admin center > Settings "
                                "> Domain names, or remove it from [sync] domains")
    if not allowed:
        return CheckResult.fail("domains", "the tenant has no verified domain besides its initial *.onmicrosoft.com "
                                "domain, which Atlassian cannot verify", "add and verify your organization's domain in "
                                "Entra (Domain names) and in Atlassian Administration (Domains)")
    how = "configured in [sync] domains, each verified in Entra" if sync.domains else "every verified domain but the initial one"
    return CheckResult.ok("domains", f"{', '.join(allowed)} ({how}); Atlassian must have verified them too "
                          "(Administration > Domains)")


def _check_groups(graph: GraphClient, sync: SyncSettings) -> CheckResult:
    """Each named group exists once; each synced group's in-scope size is within max_group_size.

    The sizes come from the run's own code (extract, flatten, scope), counted before the
    users gate's quarantine, so they are at most a few users above what a run counts.
    """
    refused, snapshot = read_tenant(graph)
    if refused is not None:
        return refused

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
        return CheckResult.fail("groups", "; ".join(problems), "; ".join(fixes))

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
        return CheckResult.fail("groups", "; ".join(problems) + within, "; ".join(fixes))
    active = sum(1 for user in users.values() if user.active)
    if sync.groups:
        shown = ", ".join(f"{name} ({size} users)" for size, name in sizes)
        return CheckResult.ok("groups", f"{shown} in scope, each within max_group_size {sync.max_group_size}; "
                              f"{active} enabled users in scope")
    largest = ", ".join(f"{name} ({size})" for size, name in sizes[:3]) or "none"
    return CheckResult.ok("groups", f"all {len(sizes)} groups, each within max_group_size {sync.max_group_size} "
                          f"(largest: {largest}); {active} enabled users in scope")


# -- Atlassian --------------------------------------------------------------------------------------


def _check_scim(settings: Settings, api_key: str) -> CheckResult:
    scim = ScimClient(settings.atlassian.scim_url, api_key, dry_run=True,  # dry-run: GET only
                      max_retry_seconds=CHECK_RETRY_SECONDS)
    return check_directory(scim, settings.atlassian.api_key)


def _check_access(settings: Settings, api_key: str) -> CheckResult:
    """The organization key is accepted, the org id is right, the SCIM directory is the org's, every product resolves."""
    access = settings.access
    admin = AdminClient(access.admin_url, access.org_id, directory_id_of(settings.atlassian.scim_url), api_key,
                        dry_run=True, max_retry_seconds=CHECK_RETRY_SECONDS)  # dry-run: reads only
    reached, workspaces = check_organization(admin, access.api_key)
    if workspaces is None:
        return reached
    references = sorted({p for products in access.groups.values() for p in products})
    try:
        resolved = resolve_products(references, workspaces)
    except ConfigError as exc:
        return CheckResult.fail("access", str(exc), "correct the product in [access.groups]: a product key the "
                                "organization has, as key@site-host where it has the product on several sites")
    products = ", ".join(f"{ref} = {w.label}" for ref, w in resolved.items()) or "none configured yet"
    return replace(reached, detail=f"{reached.detail}; products: {products}")
