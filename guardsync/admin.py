"""Client of Atlassian's Organizations REST API (the only code that talks to it): product access of groups.

The same edge rules as the SCIM client (guardsync/scim.py):

- The organization API key lives only in the Authorization header of each request (a closure, not
  an attribute): no repr, log line or exception carries it.
- Dry-run is enforced in the transport: with `dry_run=True` every request but a GET raises before
  anything is sent, except the two POSTs that only read (listing workspaces, searching groups):
  exactly those two paths, nothing else.
- 429, 5xx and connection trouble are retried within `max_retry_seconds`; a 429 waits for
  Retry-After, else for X-RateLimit-Reset (the Organizations API documents X-RateLimit-Limit,
  -Remaining and -Reset, the reset as an ISO 8601 UTC time). 401 and 403 become one AuthError line
  naming the key ([access] api_key) and what it lacks. Requests are counted by endpoint.

Endpoints used (Atlassian's reference: https://developer.atlassian.com/cloud/admin/organization/rest/,
its OpenAPI at https://dac-static.atlassian.com/cloud/admin/organization/swagger.v3.json, cross-checked
against jira.js's generated admin client, src/admin/api/{orgs,directory,workspaces,groups}.ts):

- GET  /admin/v1/orgs/{orgId}                                   org by id (check: key accepted, org id right)
- GET  /admin/v2/orgs/{orgId}/directories                       directories of the org (check: the SCIM one is there)
- POST /admin/v2/orgs/{orgId}/workspaces                        body {limit, cursor}; data[].id,
                                                                attributes.typeKey/hostUrl/capacity/usage
- POST /admin/v2/orgs/{orgId}/directories/{dirId}/groups/search body {groupNames, limit, cursor}; data[].id/name
- GET  .../groups/{groupId}/role-assignments                    data[]: {resourceId, roles[]}
- POST .../groups/{groupId}/role-assignments/assign             body {resourceId, roleId}
- POST .../groups/{groupId}/role-assignments/revoke             body {resourceId, roleId}

Pages continue while `links.next` is set; its value is the next request's `cursor`.

Not confirmed against the reference (no page of it found here): the largest `limit` of each
endpoint (100 is used; the workspaces page says up to 1000), how many `groupNames` one search
takes (50 a request are sent), whether the name match is case-sensitive (matches are compared
case-insensitively here), the exact error bodies (their `message`/`errors[].title` are shown when
present), and whether assign of a role a group already holds answers 2xx or 409 (409 is taken as
"already there").
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator
from urllib.parse import urlsplit

import requests

from guardsync.errors import ApiError, AuthError, ConfigError, Conflict, GuardsyncError, NotFound, TransientError
from guardsync.httpclient import environment_session, full_jitter, never_connected, retry_after, secret_header
from guardsync.models import CheckResult

log = logging.getLogger(__name__)

USER_ROLE = "atlassian/user"  # the product's user role: what guardsync grants
PAGE_LIMIT = 100
NAMES_PER_SEARCH = 50
TIMEOUT = (10.0, 60.0)
# The only non-GET requests a dry run may send: they read (a search body instead of a query string).
READ_ONLY_POSTS = (re.compile(r"^/admin/v2/orgs/[^/]+/workspaces$"),
                   re.compile(r"^/admin/v2/orgs/[^/]+/directories/[^/]+/groups/search$"))
_ENDPOINT_IDS = re.compile(r"/(orgs|directories|groups)/(?!search$)[^/]+")

KEY_ADVICE = (
    "Atlassian refused the organization API key, [access] api_key (401): organization API keys expire; create a new "
    "one in Atlassian Administration > Settings > API keys and store it where [access] api_key points"
)


def endpoint_key(method: str, path: str) -> str:
    """'POST /admin/v2/orgs/{id}/directories/{id}/groups/{id}/role-assignments/assign': how requests are counted."""
    return f"{method} {_ENDPOINT_IDS.sub(lambda m: f'/{m.group(1)}/{{id}}', path.split('?', 1)[0])}"


def directory_id_of(scim_url: str) -> str:
    """The directory id is the last segment of the SCIM URL (.../scim/directory/{directoryId})."""
    return urlsplit(scim_url).path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Workspace:
    """A product instance of the organization (a site's Jira, Confluence, ...)."""

    id: str
    product: str  # typeKey: jira-software, confluence, ...
    host: str  # the site's host name, from hostUrl
    capacity: int | None = None  # seats, when Atlassian states them
    usage: int | None = None  # seats in use, when Atlassian states them

    @property
    def label(self) -> str:
        return f"{self.product}@{self.host}"


class AdminClient:
    """Product access of the groups of one directory of one organization. Not shared across threads."""

    def __init__(self, admin_url: str, org_id: str, directory_id: str, api_key: str, *, dry_run: bool = False,
                 max_retry_seconds: float = 120.0):
        self.admin_url = admin_url.rstrip("/")
        self.org_id = org_id
        self.directory_id = directory_id
        self.dry_run = dry_run
        self.max_retry_seconds = max_retry_seconds
        self.requests_made: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._reached = False
        self._authorization = secret_header(api_key)  # a closure: vars() and repr() show no key
        self._session = environment_session(self.admin_url)  # REQUESTS_CA_BUNDLE and proxies honoured
        self._session.headers.update({"Accept": "application/json"})

    def __repr__(self) -> str:
        return f"AdminClient({self.admin_url!r}, org {self.org_id!r}, dry_run={self.dry_run})"

    @property
    def _org(self) -> str:
        return f"/admin/v2/orgs/{self.org_id}"

    @property
    def _groups(self) -> str:
        return f"{self._org}/directories/{self.directory_id}/groups"

    # -- reads -------------------------------------------------------------------------------------
    def organization(self) -> dict:
        """GET /admin/v1/orgs/{orgId}: the organization the key belongs to (404: not this org id)."""
        return self._call("GET", f"/admin/v1/orgs/{self.org_id}").get("data") or {}

    def directory_ids(self) -> list[str]:
        """GET /admin/v2/orgs/{orgId}/directories, every page: the org's directory ids."""
        return [d.get("directoryId") or d.get("id") for d in self._pages("GET", f"{self._org}/directories")]

    def workspaces(self) -> list[Workspace]:
        """POST /admin/v2/orgs/{orgId}/workspaces (a read), every page."""
        found = []
        for item in self._pages("POST", f"{self._org}/workspaces"):
            attributes = item.get("attributes") or {}
            host = urlsplit(attributes.get("hostUrl") or "").hostname or attributes.get("hostUrl") or ""
            found.append(Workspace(item["id"], attributes.get("typeKey") or "", host,
                                   _int_or_none(attributes.get("capacity")), _int_or_none(attributes.get("usage"))))
        return found

    def find_groups(self, names: list[str]) -> dict[str, str]:
        """Group ids by name (casefolded) from POST .../groups/search {groupNames}; absent names are left out."""
        wanted = {name.casefold() for name in names}
        found: dict[str, str] = {}
        unique = sorted(set(names))
        for start in range(0, len(unique), NAMES_PER_SEARCH):
            body = {"groupNames": unique[start : start + NAMES_PER_SEARCH]}
            for group in self._pages("POST", f"{self._groups}/search", body=body):
                name = (group.get("name") or "").casefold()
                if name in wanted:
                    found.setdefault(name, group["id"])
        return found

    def granted(self, group_id: str) -> set[str]:
        """Workspace ids where the group holds the user role (GET .../role-assignments, every page)."""
        return {a["resourceId"] for a in self._pages("GET", f"{self._groups}/{group_id}/role-assignments")
                if USER_ROLE in (a.get("roles") or [])}

    # -- writes ------------------------------------------------------------------------------------
    def assign(self, group_id: str, workspace_id: str) -> None:
        try:
            self._call("POST", f"{self._groups}/{group_id}/role-assignments/assign",
                       body={"resourceId": workspace_id, "roleId": USER_ROLE})
        except Conflict:
            pass  # holds it already (an earlier attempt whose answer was lost): the goal is reached

    def revoke(self, group_id: str, workspace_id: str) -> None:
        try:
            self._call("POST", f"{self._groups}/{group_id}/role-assignments/revoke",
                       body={"resourceId": workspace_id, "roleId": USER_ROLE})
        except NotFound:
            pass  # gone already

    # -- transport ---------------------------------------------------------------------------------
    def _pages(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        cursor = None
        while True:
            if method == "GET":
                page = self._call("GET", path, params={"limit": PAGE_LIMIT, **({"cursor": cursor} if cursor else {})})
            else:  # a cursor request carries the cursor alone (Atlassian answers 400 to a cursor mixed with filters)
                page = self._call("POST", path, body={"cursor": cursor} if cursor else {**(body or {}), "limit": PAGE_LIMIT})
            yield from page.get("data") or []
            cursor = (page.get("links") or {}).get("next")
            if not cursor:
                return

    def _call(self, method: str, path: str, *, params: dict | None = None, body: dict | None = None) -> dict:
        if self.dry_run and method != "GET" and not (method == "POST" and any(p.match(path) for p in READ_ONLY_POSTS)):
            raise GuardsyncError(f"dry-run: refused {method} {path}")
        deadline = time.monotonic() + self.max_retry_seconds
        for attempt in itertools.count():
            response, failure, wait = self._attempt(method, path, params, body)
            if response is not None:
                return self._parse_or_raise(method, path, response)
            delay = wait if wait is not None else full_jitter(attempt)
            if time.monotonic() + delay > deadline:
                raise TransientError(
                    f"Atlassian Organizations API {method} {path} failed {attempt + 1} time(s), last with {failure}; "
                    f"waiting {delay:.0f}s more would exceed the {self.max_retry_seconds:.0f}s retry budget; try again later",
                    retry_after=wait)  # the server's ask, not our backoff
            log.info("Organizations API %s %s: %s; retrying in %.1fs", method, path, failure, delay)
            _pause(delay)
        raise AssertionError("unreachable")

    def _attempt(self, method, path, params, body) -> tuple[requests.Response | None, str, float | None]:
        with self._lock:
            self.requests_made[endpoint_key(method, path)] += 1
        try:
            response = self._session.request(method, self.admin_url + path, params=params, json=body, timeout=TIMEOUT,
                                             headers=self._authorization())
        except (requests.ConnectionError, requests.Timeout) as exc:
            if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ConfigError(
                    f"[access] admin_url: TLS verification of {urlsplit(self.admin_url).netloc} failed: if a proxy or "
                    "private CA signs its certificate, set REQUESTS_CA_BUNDLE to that CA's PEM file") from None
            if not self._reached and never_connected(exc):
                raise ConfigError(f"[access] admin_url {self.admin_url} cannot be reached ({type(exc).__name__}): "
                                  "check the URL and that this host may connect to it") from None
            return None, f"{type(exc).__name__}: {exc}", None
        self._reached = True
        if response.status_code == 429 or response.status_code >= 500:
            wait = retry_after(response)
            if wait is None and response.status_code == 429:
                wait = _until_reset(response.headers.get("X-RateLimit-Reset"))
            return None, f"{response.status_code} {_detail(response)}", wait
        return response, "", None

    def _parse_or_raise(self, method: str, path: str, response: requests.Response) -> dict:
        """The one place answers of the Organizations API become guardsync errors."""
        status = response.status_code
        if status < 400:
            return response.json() if response.content else {}
        if status == 401:
            raise AuthError(KEY_ADVICE)
        if status == 403:
            raise AuthError(
                f"the organization API key, [access] api_key, may not {method} {endpoint_key(method, path).split(' ', 1)[1]} "
                f"(403: {_detail(response)}): use an organization admin's API key without scopes (some endpoints refuse "
                f"keys created with scopes), or one with the scopes read:workspaces:admin, read:groups:admin, "
                f"read:directories:admin and write:groups:admin")
        message = f"Atlassian Organizations API refused {method} {path} ({status}): {_detail(response)}"
        raise {404: NotFound, 409: Conflict}.get(status, ApiError)(message, status=status)


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason or "no detail"
    if isinstance(body, dict):
        errors = body.get("errors") or []
        first = errors[0] if errors and isinstance(errors[0], dict) else {}
        return str(body.get("message") or first.get("title") or first.get("detail") or body)[:300]
    return str(body)[:300]


def _until_reset(value: str | None) -> float | None:
    """Seconds until X-RateLimit-Reset (ISO 8601, UTC); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - time.time())
    except ValueError:
        return None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _pause(seconds: float) -> None:
    time.sleep(seconds)  # its own function so tests can see the delays without waiting


# == guardsync check: the Organizations API probe ==================================================


def check_organization(admin: AdminClient, key_reference: str) -> tuple[CheckResult, list[Workspace] | None]:
    """The "access" line as far as the API answers it (the key is accepted, the org id is right, the SCIM
    directory is the org's), and the org's workspaces, against which guardsync.check resolves the products.
    Give a dry-run client: it only reads."""
    try:
        organization = admin.organization()
    except AuthError as exc:
        return CheckResult.fail("access", str(exc), "in Atlassian Administration > Settings > API keys, create an "
                                f"organization API key and store it where access.api_key points ({key_reference})"), None
    except NotFound as exc:
        return CheckResult.fail("access", f"the organization API key does not reach organization {admin.org_id} ({exc})",
                                "copy the organization id from the Atlassian Administration URL (admin.atlassian.com/o/"
                                "ORG_ID) into [access] org_id, and use a key of that organization"), None
    name = (organization.get("attributes") or {}).get("name") or admin.org_id
    if admin.directory_id not in admin.directory_ids():
        return CheckResult.fail("access", f"the SCIM directory {admin.directory_id} (from atlassian.scim_url) is not a "
                                f"directory of organization {name} ({admin.org_id})", "use the organization that holds "
                                "the SCIM directory, or the SCIM URL of a directory of this organization"), None
    return CheckResult.ok("access", f"organization {name} ({admin.org_id}) accepts the organization API key; directory "
                          f"{admin.directory_id} is one of its directories"), admin.workspaces()
