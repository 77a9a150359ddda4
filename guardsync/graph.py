"""The Microsoft Graph edge: app-only auth with msal, paged reads, retries, one error mapping.

`GraphClient.extract()` reads the whole tenant (users, groups, direct memberships,
domains, organization) into a `Snapshot`. `GraphClient.read_changes()` reads only what
changed since the last run through Graph delta queries (`/users/delta`, `/groups/delta`),
as `GraphChanges` that `guardsync.delta.apply_changes` merges into the previous Snapshot;
an expired delta link turns into a full read, transparently. Every Graph answer is turned into data or
a guardsync error in one place (`_interpret`), so nothing above this module sees
HTTP. Secrets and tokens never reach a message, a log line or an exception.

At the end, the probes `guardsync check` runs against Entra and Graph, and the permissions
the app needs (which `guardsync init` prints too).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import quote, urlsplit

import jwt
import msal
import numpy as np
import pandas as pd
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS
from msal.exceptions import MsalServiceError

from guardsync.errors import ApiError, AuthError, ConfigError, GuardsyncError, NotFound, TransientError
from guardsync.httpclient import environment_session, full_jitter, never_connected, retry_after
from guardsync.models import (EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, CheckResult, Snapshot, select_names, text_frame,
                              user_columns)

if TYPE_CHECKING:  # annotations only: the client takes plain values, its `guardsync check` probes read settings
    from guardsync.config import AttributeSettings, EntraSettings

log = logging.getLogger(__name__)

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_GRAPH_URL = "https://graph.microsoft.com"
PAGE_SIZE = 999  # Graph's largest page: fewest requests, fewest resource units
TIMEOUT = (10, 60)  # connect, read (seconds): a silent server must not hang a run
ODATA_PREFIX = "#microsoft.graph."

# Delta queries. Graph does not support $top on user and group delta: the page size is asked
# for with the OData preference below, and Graph caps it (about 200 objects, 500 member links).
DELTA_HEADERS = {"Prefer": "odata.maxpagesize=999"}
GROUP_DELTA_QUERY = {"$select": "displayName,members"}  # members: members@delta on each group
# An expired or reset delta (or skip) token: 410 Gone, or these error codes (any 4xx). Both mean
# "read everything again". https://learn.microsoft.com/graph/delta-query-overview (Synchronization
# reset, Token duration) and https://learn.microsoft.com/graph/errors (code property).
DELTA_RESET_CODES = {"syncstatenotfound", "resyncrequired"}
# Graph's 400 for a $select naming a property the type does not have (an [attributes] source).
UNKNOWN_PROPERTY = re.compile(r"Could not find a property named '([^']+)' on type 'microsoft\.graph\.user'")

# The application permission each read needs (all need admin consent).
PERMISSIONS = {
    "GET /v1.0/users": "User.Read.All",
    "GET /v1.0/groups": "Group.Read.All",
    "GET /v1.0/groups/{id}/members": "GroupMember.Read.All (or Group.Read.All)",
    "GET /v1.0/groups/{id}/transitiveMembers": "GroupMember.Read.All (or Group.Read.All)",
    "GET /v1.0/domains": "Domain.Read.All",
    "GET /v1.0/organization": "Organization.Read.All",
    "GET /v1.0/users/delta": "User.Read.All",
    "GET /v1.0/groups/delta": "GroupMember.Read.All (or Group.Read.All)",
}
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
ALL_PERMISSIONS = ", ".join(PERMISSION_REASONS)

# What to do about an AADSTS code from the token endpoint.
LOGIN_ADVICE = {
    7000215: "create a new client secret for app {client_id} and update entra.client_secret",
    7000222: "the client secret has expired: create a new one for app {client_id} and update entra.client_secret",
    7000218: "set entra.client_secret or entra.certificate_path",
    700016: "check entra.client_id, and that app {client_id} is registered in (or consented to by) tenant {tenant}",
    700027: "upload the certificate in entra.certificate_path to app {client_id} (Certificates & secrets)",
    700024: "check this machine's clock: the certificate assertion fell outside its valid time",
    90002: "check entra.tenant_id (the tenant GUID or its *.onmicrosoft.com domain) and entra.authority_host",
    1002012: "check entra.graph_url: the scope must be that URL followed by /.default",
    70011: "check entra.graph_url: the scope must be that URL followed by /.default",
    7000112: "app {client_id} is disabled in tenant {tenant}: enable it (Enterprise applications) or use another",
}
TRANSIENT_LOGIN_ERRORS = {"temporarily_unavailable", "server_error"}


class _Retry(Exception):
    """A transient failure: wait (Retry-After when given) and try again within the budget."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _StaleToken(Exception):
    """Graph answered 401: the token expired or was revoked; a fresh one may do."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class DeltaLinkExpired(ApiError):
    """Graph no longer knows a delta link (expired after 7 days, or a sync reset): read everything again."""


@dataclass
class DeltaLinks:
    """The @odata.deltaLink of each delta query: what the state store keeps between runs."""

    users: str | None = None
    groups: str | None = None


@dataclass
class GraphChanges:
    """One round of Graph delta queries, netted (the last change of an object or membership wins).

    `full` True: a complete picture (first round, or the resync after an expired link);
    `users`/`groups` then hold every object and `added_edges` every membership. Otherwise
    only what changed: a user dict holds `id` and the properties Graph returned (Graph may
    leave unchanged or never-set ones out), a group dict `id` and `displayName` when given.
    Removed users and groups (deleted or soft-deleted alike) take their memberships with them.
    """

    full: bool
    users: list[dict]
    removed_users: list[str]
    groups: list[dict]
    removed_groups: list[str]
    added_edges: list[tuple[str, str, str | None]]  # (group_id, member_id, member_type)
    removed_edges: list[tuple[str, str]]  # (group_id, member_id)
    links: DeltaLinks
    verified_domains: list[str]
    initial_domain: str | None
    tenant_id: str
    organization: str
    user_columns: list[str] | None = None  # the users frame's columns these user dicts carry (USER_COLUMNS + mapped sources)

    @property
    def is_empty(self) -> bool:
        """Nothing changed (never true of a full read)."""
        return not (self.full or self.users or self.removed_users or self.groups or self.removed_groups
                    or self.added_edges or self.removed_edges)


class _LoginSession(requests.Session):
    """msal's HTTP client: a plain Session (so REQUESTS_CA_BUNDLE applies) that never waits forever."""

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT)
        return super().request(method, url, **kwargs)


def endpoint_pattern(method: str, path: str) -> str:
    """"GET /v1.0/groups/{id}/members", "POST /{tenant}/oauth2/v2.0/token": ids collapsed, as the emulator counts."""
    parts = path.split("/")
    if len(parts) > 2 and parts[1] != "v1.0":
        parts[1] = "{tenant}"  # login endpoints: /{tenant}/oauth2/..., /{tenant}/v2.0/...
    for i in range(3, len(parts)):
        if parts[i - 1] in ("users", "groups") and parts[i] != "delta":
            parts[i] = "{id}"
    return f"{method} {'/'.join(parts)}"


class GraphClient:
    """Reads one Entra tenant through Microsoft Graph v1.0 with an app-only token."""

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str | None = None,
        certificate_path: str | None = None,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        graph_url: str = DEFAULT_GRAPH_URL,
        max_retry_seconds: float = 120.0,
        read_timeout: float | None = None,
        member_read_concurrency: int = 4,
        user_columns: list[str] | None = None,
    ):
        if (client_secret is None) == (certificate_path is None):
            raise ConfigError("[entra] needs exactly one of client_secret and certificate_path: set one, remove the other")
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.authority_host = authority_host.rstrip("/")
        self.graph_url = graph_url.rstrip("/")
        self.max_retry_seconds = max_retry_seconds  # how long one request may be retried ([sync] retry_budget_seconds)
        self.timeout = (TIMEOUT[0], read_timeout) if read_timeout else TIMEOUT
        self.member_read_concurrency = max(1, member_read_concurrency)
        # What a full read selects of each user: USER_COLUMNS and the sources [attributes] maps
        # (models.user_columns). A delta round reads what its link was issued with (read_changes).
        self.user_columns = list(user_columns or USER_COLUMNS)
        self.requests_made: Counter[str] = Counter()  # "GET /v1.0/users" -> requests sent, retries included
        # (stage, items read, items expected): the total grows by a page while more pages follow
        self.on_progress: Callable[[str, int, int], None] = lambda stage, done, total: None

        self._secret = client_secret  # kept only to scrub it from any text we pass on
        self._credential = client_secret if client_secret is not None else certificate_credential(certificate_path)
        self._scopes = [f"{self.graph_url}/.default"]
        self._app: msal.ConfidentialClientApplication | None = None  # one per client: its token cache is reused
        self._login_reached = self._graph_reached = False  # a refused first contact is a wrong URL, not a blip
        self._token_lock = threading.Lock()  # one token request at a time, however many readers wait
        self._count_lock = threading.Lock()
        self._login_http = self._session(_LoginSession())
        self._graph_http = self._session(environment_session(self.graph_url), pool=self.member_read_concurrency + 2)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        self._graph_http.close()
        self._login_http.close()

    def __enter__(self) -> "GraphClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the whole tenant ------------------------------------------------------
    def extract(self) -> Snapshot:
        """Users, groups, direct memberships, domains and organization, as one Snapshot."""
        tenant = self._tenant_facts()
        users = self.read_all("/users", self._user_query(self.user_columns, PAGE_SIZE))
        groups = self.read_all("/groups", {"$select": "id,displayName", "$top": PAGE_SIZE})
        return Snapshot(
            users=_users_frame(users, self.user_columns),
            groups=text_frame({c: [g.get(c) for g in groups] for c in GROUP_COLUMNS}, GROUP_COLUMNS),
            edges=self._edges([g["id"] for g in groups]),
            **tenant,
        )

    def _tenant_facts(self) -> dict:
        """tenant_id, organization, verified_domains, initial_domain: two small reads, every run."""
        organization = self.read_all("/organization", {"$select": "id,displayName"})[0]
        domains = self.read_all("/domains", {"$select": "id,isVerified,isInitial,isDefault"})
        return dict(
            tenant_id=organization["id"],
            organization=organization.get("displayName") or "",
            verified_domains=[d["id"] for d in domains if d.get("isVerified")],
            initial_domain=next((d["id"] for d in domains if d.get("isInitial")), None),
        )

    # -- what changed since the last run ---------------------------------------------
    def read_changes(self, links: DeltaLinks | None = None, user_columns: list[str] | None = None) -> GraphChanges:
        """Changes since `links` (one delta round per endpoint); with no links, or expired ones, everything.

        A run with no change in Entra costs four Graph requests: organization, domains,
        and one page of each delta query. Store `result.links` for the next run.
        `user_columns` (default: the client's) are the users frame's columns: a delta link
        returns what it was issued with, so pass the columns of the snapshot it belongs to.
        """
        columns = list(user_columns or self.user_columns)
        tenant = {**self._tenant_facts(), "user_columns": columns}
        stored = [links.users, links.groups] if links else [None, None]
        if None not in stored and not all(link.startswith(self.graph_url + "/") for link in stored):
            log.warning("stored Graph delta links are not on %s (entra.graph_url changed?): reading everything", self.graph_url)
            stored = [None, None]
        if None not in stored:
            try:
                users, users_link = self._delta_round(stored[0])
                groups, groups_link = self._delta_round(stored[1])
                return _changes(False, users, groups, DeltaLinks(users_link, groups_link), tenant)
            except DeltaLinkExpired as expired:
                log.warning("Graph delta link expired (%s): reading everything again (full resync)", expired.code or expired.status)
        for attempt in range(2):  # a link can expire while a long initial round pages through it
            try:
                with ThreadPoolExecutor(2, thread_name_prefix="graph-full") as pool:  # two independent page chains
                    users_read = pool.submit(self._all_users_and_link, columns)
                    groups, groups_link = pool.submit(self._delta_round, "/groups/delta", GROUP_DELTA_QUERY).result()
                    users, users_link = users_read.result()
                return _changes(True, users, groups, DeltaLinks(users_link, groups_link), tenant)
            except DeltaLinkExpired as expired:
                if attempt:
                    raise
                log.warning("Graph delta paging expired mid-round (%s): starting the full read again", expired.code or expired.status)
        raise AssertionError("unreachable")

    def _all_users_and_link(self, columns: list[str]) -> tuple[list[dict], str]:
        """Every user at 999 a page, and a delta link for the next run.

        Delta pages are smaller than plain ones, so a full read lists /users and asks delta
        only for a link "from now" ($deltatoken=latest), taken first: a change made during
        the listing is then replayed by the next run, never missed (replays are harmless).
        """
        _, link = self._delta_round("/users/delta", {**self._user_query(columns), "$deltatoken": "latest"})
        return self.read_all("/users", self._user_query(columns, PAGE_SIZE)), link

    @staticmethod
    def _user_query(columns: list[str], top: int | None = None) -> dict:
        """$select of exactly what these columns need (a sub-property through its parent)."""
        query: dict = {"$select": ",".join(select_names(columns))}
        if top is not None:
            query["$top"] = top
        return query

    def _delta_round(self, path_or_link: str, params: dict | None = None) -> tuple[list[dict], str]:
        """Every item of one delta round, following @odata.nextLink to the @odata.deltaLink."""
        body = self.get(path_or_link, params, headers=DELTA_HEADERS, page=True)
        items: list[dict] = []
        stage = "read " + urlsplit(self._absolute(path_or_link)).path.rsplit("/", 2)[-2]  # "read users"
        while True:
            items.extend(body["value"])
            more = "@odata.nextLink" in body
            self.on_progress(stage, len(items), len(items) + (len(body["value"]) if more else 0))
            if next_link := body.get("@odata.nextLink"):
                body = self.get(next_link, headers=DELTA_HEADERS, page=True)
            elif delta_link := body.get("@odata.deltaLink"):
                return items, delta_link
            else:
                raise GuardsyncError("Microsoft Graph ended a delta page with neither @odata.nextLink nor @odata.deltaLink; run again")

    def direct_members(self, group_id: str) -> list[dict]:
        """A group's direct members: id and @odata.type only."""
        return self.read_all(f"/groups/{group_id}/members", {"$select": "id", "$top": PAGE_SIZE})

    def _edges(self, group_ids: list[str]) -> pd.DataFrame:
        """Direct memberships of every group, read `member_read_concurrency` groups at a time."""
        columns: dict[str, list] = {c: [] for c in EDGE_COLUMNS}
        pool = ThreadPoolExecutor(self.member_read_concurrency, thread_name_prefix="graph-members")
        try:
            for group_id, members in zip(group_ids, pool.map(self.direct_members, group_ids)):
                columns["group_id"].extend([group_id] * len(members))
                columns["member_id"].extend(m["id"] for m in members)
                columns["member_type"].extend(m.get("@odata.type", "").removeprefix(ODATA_PREFIX) or None for m in members)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the groups not yet started
        return text_frame(columns, EDGE_COLUMNS)

    # -- paged reads -------------------------------------------------------------
    def read_all(self, path: str, params: dict | None = None) -> list[dict]:
        return [item for page in self.pages(path, params) for item in page]

    def pages(self, path: str, params: dict | None = None) -> Iterator[list[dict]]:
        """Each page's `value`, following @odata.nextLink unchanged (it carries the query)."""
        body = self.get(path, params, page=True)
        yield body["value"]
        while next_link := body.get("@odata.nextLink"):
            body = self.get(next_link, page=True)
            yield body["value"]

    def get(self, path_or_url: str, params: dict | None = None, headers: dict | None = None, page: bool = False) -> dict:
        """One Graph GET ("/users" or a nextLink): retried while transient, one fresh token on 401."""
        url = self._absolute(path_or_url)
        endpoint = endpoint_pattern("GET", urlsplit(url).path)
        deadline = time.monotonic() + self.max_retry_seconds
        tried_fresh_token, attempt = False, 0
        while True:
            token = self._access_token()
            try:
                body = self._interpret(self._send(url, params, token, headers), endpoint)
                if page and not isinstance(body.get("value"), list):
                    # Never read as an empty last page: a partial read must not deprovision anyone.
                    raise _Retry("a page without its value array")
                return body
            except _StaleToken as stale:
                if tried_fresh_token:
                    raise AuthError(
                        f"Microsoft Graph rejected a fresh token of app {self.client_id} on {endpoint} ({stale.detail}): "
                        "check that entra.graph_url is the Graph of the cloud entra.authority_host signs in to"
                    ) from None
                tried_fresh_token = True
                self._forget_token(token)
            except _Retry as retry:
                self._pause(retry, attempt, deadline, endpoint)
                attempt += 1

    def _absolute(self, path_or_url: str) -> str:
        if not path_or_url.startswith(("https://", "http://")):
            return f"{self.graph_url}/v1.0{path_or_url}"
        if not path_or_url.startswith(self.graph_url + "/"):
            # Following it would hand our token to another host.
            raise GuardsyncError(f"Microsoft Graph sent a next page outside {self.graph_url}; refusing to follow it")
        return path_or_url

    def _send(
        self, url: str, params: dict | None, token: str, extra_headers: dict | None = None
    ) -> requests.Response | requests.RequestException:
        headers = {**(extra_headers or {}), "Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            return self._graph_http.get(url, params=params, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            return exc

    def _interpret(self, answer: requests.Response | requests.RequestException, endpoint: str) -> dict:
        """The one mapping of a Graph answer: the JSON body, or _Retry, _StaleToken or a guardsync error."""
        if isinstance(answer, requests.RequestException):
            first = None if self._graph_reached else _unreachable(answer, "entra.graph_url", self.graph_url)
            raise _tls_config_error(answer) or first or _Retry(f"{type(answer).__name__} talking to {self.graph_url}")
        self._graph_reached = True
        status = answer.status_code
        if status < 300:
            try:
                return answer.json()
            except ValueError:
                raise _Retry("unreadable JSON (truncated page)") from None
        code, message = _graph_error(answer)
        if status == 401:
            raise _StaleToken(f"{code}: {message}")
        if status == 403:
            needed = PERMISSIONS.get(endpoint, ALL_PERMISSIONS)
            raise AuthError(
                f"Microsoft Graph denied {endpoint} to app {self.client_id} ({code}: {message}): grant it the application "
                f"permission {needed} with admin consent (guardsync needs {ALL_PERMISSIONS})"
            )
        if status in (429, 500, 502, 503, 504):
            raise _Retry(f"HTTP {status} {code or ''}".strip(), retry_after(answer))
        if status == 400 and (unknown := UNKNOWN_PROPERTY.search(message)):
            raise ConfigError(
                f"Microsoft Graph has no user property {unknown[1]!r} ({endpoint} answered 400): correct the source in "
                "[attributes] (a Graph user property as $select names it, onPremisesExtensionAttributes.extensionAttributeN, "
                "or extension_<appId>_<name> of an extension registered in the tenant); `guardsync check` lists them"
            )
        if status == 410 or (code or "").lower() in DELTA_RESET_CODES:
            raise DeltaLinkExpired(f"Microsoft Graph expired the delta link of {endpoint}: HTTP {status} {code}: {message}", status=status, code=code)
        error = NotFound if status == 404 else ApiError
        raise error(f"Microsoft Graph refused {endpoint}: HTTP {status} {code}: {message}", status=status, code=code)

    def _pause(self, retry: _Retry, attempt: int, deadline: float, what: str) -> None:
        """Sleep before the next try, or give up with TransientError when that would overrun the budget."""
        wait = retry.retry_after if retry.retry_after is not None else full_jitter(attempt)
        if time.monotonic() + wait > deadline:
            asked = f", and it asked to wait {wait:g} s more" if retry.retry_after is not None else ""
            raise TransientError(
                f"{what} kept failing within the retry budget of {self.max_retry_seconds:g} s ([sync] "
                f"retry_budget_seconds; last: {retry.reason}{asked}): Microsoft Graph or Entra is throttling or "
                "unavailable; run again later, or raise the budget",
                retry_after=retry.retry_after,
            )
        log.warning("%s: %s; retrying in %.1f s", what, retry.reason, wait)
        time.sleep(wait)

    # -- tokens --------------------------------------------------------------------
    def _access_token(self) -> str:
        """An app token from msal's cache, or a new one from Entra (token requests retried while transient)."""
        deadline, attempt = time.monotonic() + self.max_retry_seconds, 0
        while True:
            try:
                result = self._acquire()
            except _Retry as retry:
                self._pause(retry, attempt, deadline, f"token request to {self.authority_host}")
                attempt += 1
                continue
            if "access_token" in result:
                return result["access_token"]
            raise self._login_refused(result)

    def _acquire(self) -> dict:
        try:
            with self._token_lock:
                result = self._msal().acquire_token_for_client(self._scopes)
        except requests.RequestException as exc:
            first = None if self._login_reached else _unreachable(exc, "entra.authority_host", self.authority_host)
            raise _tls_config_error(exc) or first or _Retry(f"{type(exc).__name__} talking to {self.authority_host}") from None
        except MsalServiceError:  # msal raises it for a 5xx from the token or discovery endpoint
            raise _Retry("Entra answered 5xx") from None
        except ValueError:  # msal could not parse the token answer (e.g. a 429 with an empty body)
            raise _Retry("unreadable token answer") from None
        self._login_reached = True
        if result.get("error") in TRANSIENT_LOGIN_ERRORS:
            raise _Retry(f"Entra answered {result['error']}")
        return result

    def _msal(self) -> msal.ConfidentialClientApplication:
        """The one msal application of this client, made on first use (making it fetches OpenID metadata)."""
        if self._app is None:
            host = urlsplit(self.authority_host).hostname
            try:
                self._app = msal.ConfidentialClientApplication(
                    self.client_id,
                    client_credential=self._credential,
                    authority=f"{self.authority_host}/{self.tenant_id}",
                    # msal asks login.microsoftonline.com about hosts it does not know: not for configured ones.
                    instance_discovery=None if host in WELL_KNOWN_AUTHORITY_HOSTS else False,
                    azure_region=False,  # so MSAL_FORCE_REGION cannot reroute the token request
                    http_client=self._login_http,
                )
            except ValueError as exc:
                raise self._authority_error(exc) from None
        return self._app

    def _authority_error(self, exc: ValueError) -> ConfigError:
        if "authority configuration" in str(exc):
            return ConfigError(
                f"Entra at {self.authority_host} does not know tenant {self.tenant_id!r}: set entra.tenant_id to the "
                "tenant GUID or its *.onmicrosoft.com domain, and entra.authority_host to your cloud's login host"
            )
        return ConfigError(f"msal refused the [entra] settings ({self._redact(str(exc))}): check entra.authority_host and the credential")

    def _forget_token(self, rejected: str) -> None:
        """Drop a token Graph refused from msal's cache: msal has no force_refresh for app tokens."""
        cache = self._msal().token_cache
        with self._token_lock:
            for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=self._scopes)):
                if entry.get("secret") == rejected:
                    cache.remove_at(entry)

    def _login_refused(self, result: dict) -> AuthError:
        """One line naming the AADSTS code, what Entra said, and the fix; no secret in it."""
        description = str(result.get("error_description") or "")
        code = (result.get("error_codes") or [None])[0]
        if code is None and (match := re.match(r"AADSTS(\d+)", description)):
            code = int(match[1])
        said = re.sub(r"^AADSTS\d+:\s*", "", description).split("\r\n")[0].split("\n")[0][:200]
        advice = LOGIN_ADVICE.get(code, "check entra.tenant_id, entra.client_id and the app's credential").format(
            client_id=self.client_id, tenant=self.tenant_id
        )
        return AuthError(self._redact(f"Entra refused the client credentials of app {self.client_id} (AADSTS{code}: {said}): {advice}"))

    # -- plumbing ------------------------------------------------------------------
    def _session(self, session: requests.Session, pool: int = 10) -> requests.Session:
        """REQUESTS_CA_BUNDLE and proxies apply (see environment_session); verify is never turned off."""
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.hooks["response"].append(self._count)
        return session

    def _count(self, response: requests.Response, *args, **kwargs) -> None:
        key = endpoint_pattern(response.request.method, urlsplit(response.request.url).path)
        with self._count_lock:
            self.requests_made[key] += 1

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text


# -- helpers -----------------------------------------------------------------------------


def user_values(item: dict, columns: list[str]) -> dict:
    """The frame's values of one Graph user dict: for each column whose property the dict carries,
    a sub-property taken from its parent, a list's first value, a mapped source as text."""
    values = {}
    for column in columns:
        parent, _, sub = column.partition(".")
        if parent not in item:
            continue  # not returned (a delta item carries what changed): the stored value stays
        value = item[parent]
        if sub:
            value = value.get(sub) if isinstance(value, dict) else None
        if column not in _USER_KEYS:
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None and not isinstance(value, str):
                value = str(value)
        values[column] = value
    return values


def _users_frame(users: list[dict], columns: list[str]) -> pd.DataFrame:
    rows = [user_values(u, columns) for u in users]
    data = {c: [row.get(c) for row in rows] for c in columns}
    # Graph always returns accountEnabled when selected; a missing one reads as disabled, so nobody gains access by accident.
    data["accountEnabled"] = np.array([u.get("accountEnabled") is True for u in users], dtype=bool)
    return text_frame(data, columns)


_USER_KEYS = frozenset(USER_COLUMNS)
_REMOVED = object()  # a membership's last change was its removal


def _changes(full: bool, users: list[dict], groups: list[dict], links: DeltaLinks, tenant: dict) -> GraphChanges:
    """Net one round of delta items: the last word on each object and membership wins, so a
    replayed change, or a big group spread over several pages, comes out once."""
    changed_users, removed_users = _net_users(users, tenant.get("user_columns") or USER_COLUMNS)
    changed_groups, removed_groups, edges = _net_groups(groups)
    gone = set(removed_groups)
    return GraphChanges(
        full=full,
        users=changed_users,
        removed_users=removed_users,
        groups=changed_groups,
        removed_groups=removed_groups,
        added_edges=[(g, m, t) for (g, m), t in edges.items() if t is not _REMOVED and g not in gone],
        removed_edges=[(g, m) for (g, m), t in edges.items() if t is _REMOVED and g not in gone],
        links=links,
        **tenant,
    )


def _net_users(items: list[dict], columns: list[str]) -> tuple[list[dict], list[str]]:
    changed: dict[str, dict] = {}
    removed: dict[str, None] = {}  # an ordered set
    for item in items:
        user_id = item["id"]
        if "@removed" in item:  # deleted ("deleted") or soft-deleted ("changed"): gone either way
            changed.pop(user_id, None)
            removed[user_id] = None
        else:
            removed.pop(user_id, None)
            record = changed.setdefault(user_id, {"id": user_id})
            record.update(user_values(item, columns))
    return list(changed.values()), list(removed)


def _net_groups(items: list[dict]) -> tuple[list[dict], list[str], dict[tuple[str, str], object]]:
    changed: dict[str, dict] = {}
    removed: dict[str, None] = {}
    edges: dict[tuple[str, str], object] = {}  # (group, member) -> member type, or _REMOVED
    for item in items:
        group_id = item["id"]
        if "@removed" in item:
            changed.pop(group_id, None)
            removed[group_id] = None
            continue
        removed.pop(group_id, None)
        record = changed.setdefault(group_id, {"id": group_id})
        if "displayName" in item:
            record["displayName"] = item["displayName"]
        for member in item.get("members@delta") or ():
            key = (group_id, member["id"])
            edges.pop(key, None)  # re-insert: the order of the last change
            edges[key] = _REMOVED if "@removed" in member else (member.get("@odata.type", "").removeprefix(ODATA_PREFIX) or None)
    return list(changed.values()), list(removed), edges


def _graph_error(response: requests.Response) -> tuple[str | None, str]:
    """Graph's {"error": {"code", "message"}}, or the start of whatever else came back."""
    try:
        error = response.json()["error"]
        return error.get("code"), error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, (response.text or response.reason or "")[:200]


def _unreachable(exc: requests.RequestException, key: str, url: str) -> ConfigError | None:
    """No connection at all on the very first contact: a configuration problem, not worth minutes of retries."""
    if never_connected(exc):
        return ConfigError(f"{key} {url} cannot be reached ({type(exc).__name__}): check the URL and that this host may connect to it")
    return None


def _tls_config_error(exc: requests.RequestException) -> ConfigError | None:
    """A certificate that does not verify will not heal by retrying: say how to trust it."""
    if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        host = urlsplit(exc.request.url).hostname if exc.request is not None else "the server"
        return ConfigError(
            f"TLS verification of {host} failed: if a proxy or private CA signs its certificate, set REQUESTS_CA_BUNDLE "
            "to that CA's PEM file (verification is never turned off)"
        )
    return None


def certificate_credential(path: str) -> dict:
    """msal's certificate credential from one PEM file holding the private key and the certificate."""
    try:
        pem = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"entra.certificate_path {path} cannot be read ({exc.strerror}): point it at the PEM file with the key and certificate") from None
    blocks = re.findall(r"(-----BEGIN ([A-Z ]+)-----.*?-----END \2-----)", pem, flags=re.S)
    keys = [text for text, kind in blocks if kind.endswith("PRIVATE KEY")]
    certificates = [text for text, kind in blocks if kind == "CERTIFICATE"]
    if not keys or not certificates or any("ENCRYPTED" in key for key in keys):
        raise ConfigError(
            f"entra.certificate_path {path} must hold an unencrypted private key and its certificate in PEM: "
            "export both into one file (e.g. openssl pkcs12 -in app.pfx -nodes -out app.pem)"
        )
    try:
        serialization.load_pem_private_key(keys[0].encode(), password=None)
        certificate = x509.load_pem_x509_certificate(certificates[0].encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"entra.certificate_path {path} holds an unreadable key or certificate ({exc}): export them again") from None
    return {
        "private_key": keys[0],
        "thumbprint": certificate.fingerprint(hashes.SHA1()).hex().upper(),  # Entra identifies app certificates by SHA-1
        "public_certificate": certificates[0],
    }


# == guardsync check: the Graph probes ============================================================
# Each asks Entra or Graph what a run will ask and turns the client's errors into one FAIL line
# with its fix (guardsync.check runs them; the init command prints `permission_lines`).

GRAPH_UNREACHABLE_FIX = "check that Microsoft Graph is reachable from here and run guardsync check again"


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


def check_token(graph: GraphClient, entra: EntraSettings) -> tuple[CheckResult, dict | None]:
    """The "token" line, and the token's claims when Entra issued one."""
    try:
        token = graph._access_token()  # the client's own msal path: same retries and AADSTS advice as a run
    except AuthError as exc:
        where = (f"the secret in {entra.client_secret}" if entra.client_secret
                 else f"the certificate {entra.certificate_path}")
        return CheckResult.fail("token", str(exc), f"check entra.tenant_id and entra.client_id, and that {where} belongs "
                                f"to app {entra.client_id} (Entra admin center > App registrations > Certificates & "
                                "secrets); a new secret must replace the old one where the reference points"), None
    except TransientError as exc:
        return CheckResult.fail("token", str(exc), f"check that {entra.authority_host} is reachable from here (proxy: "
                                "HTTPS_PROXY; private CA: REQUESTS_CA_BUNDLE) and run guardsync check again"), None
    except ConfigError as exc:
        return CheckResult.fail("token", str(exc), "correct the [entra] settings named above"), None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})  # guardsync is not the audience: read only
    except jwt.PyJWTError:
        claims = {}
    valid_until = ""
    if isinstance(claims.get("exp"), (int, float)):
        valid_until = f", valid until {datetime.fromtimestamp(claims['exp'], timezone.utc):%H:%M} UTC"
    detail = (f"Entra at {entra.authority_host} issued an app token to {claims.get('appid', entra.client_id)} "
              f"for tenant {claims.get('tid', entra.tenant_id)}{valid_until}")
    return CheckResult.ok("token", detail), claims


def check_permissions(claims: dict, entra: EntraSettings) -> CheckResult:
    """The "permissions" line: the token carries every role in REQUIRED_ROLES (or a broader one)."""
    consent = admin_consent_url(entra.authority_host, entra.tenant_id, entra.client_id)
    if not claims:
        return CheckResult.fail(
            "permissions", "the access token is not a JWT, so its application roles cannot be read",
            f"check in Entra admin center > App registrations > {entra.client_id} > API permissions that the app has "
            f"{', '.join(PERMISSION_REASONS)} (Application) with admin consent: {consent}")
    roles = set(claims.get("roles") or [])
    missing = [name for name, accepted in REQUIRED_ROLES if not roles & accepted]
    granted = ", ".join(sorted(roles)) or "none"
    if missing:
        return CheckResult.fail(
            "permissions", f"the token lacks the application permission(s) {', '.join(missing)} (granted: {granted})",
            f"in Entra admin center > App registrations > {entra.client_id} > API permissions, add Microsoft Graph > "
            f"Application permissions > {', '.join(missing)}, then grant admin consent ({consent}); "
            "tokens issued after the consent carry them",
        )
    return CheckResult.ok("permissions", f"the token carries the application roles {granted}")


def check_tenant(graph: GraphClient) -> tuple[CheckResult, Snapshot | None]:
    """The "tenant" line, and the tenant (organization and domains, no users or groups) when Graph returned it."""
    try:
        facts = graph._tenant_facts()  # what every run reads first
    except (AuthError, NotFound) as exc:
        return CheckResult.fail("tenant", str(exc), "grant the permission the message names (Application type) with "
                                "admin consent, or check entra.graph_url"), None
    except TransientError as exc:
        return CheckResult.fail("tenant", str(exc), GRAPH_UNREACHABLE_FIX), None
    tenant = Snapshot(users=pd.DataFrame(columns=USER_COLUMNS), groups=pd.DataFrame(columns=GROUP_COLUMNS),
                      edges=pd.DataFrame(columns=EDGE_COLUMNS), **facts)
    detail = (f"{tenant.organization or '(no name)'} ({tenant.tenant_id}); verified domains: "
              f"{', '.join(tenant.verified_domains) or 'none'}; make sure this is the tenant you mean to sync")
    return CheckResult.ok("tenant", detail), tenant


def read_tenant(graph: GraphClient) -> tuple[CheckResult | None, Snapshot | None]:
    """The whole tenant as a run reads it (for the "groups" line), or that line's FAIL when Graph refuses."""
    try:
        return None, graph.extract()
    except (AuthError, NotFound) as exc:
        return CheckResult.fail("groups", str(exc), "grant the permission the message names (Application type) with "
                                "admin consent"), None
    except TransientError as exc:
        return CheckResult.fail("groups", str(exc), GRAPH_UNREACHABLE_FIX), None


def check_attributes(graph: GraphClient, attributes: AttributeSettings) -> CheckResult:
    """The "attributes" line: Graph returns every mapped source in a user list (what runs read), and the app may read it.

    One page of one user with the run's $select; when Graph refuses it, each source alone, so
    the line names every source at fault."""
    mapping = attributes.mapping()
    columns = user_columns(attributes.sources())
    if _user_list_refused(graph, columns) is None:
        shown = ", ".join(f"{attributes.key_of(field)} = {source}" for field, source in mapping.items())
        return CheckResult.ok("attributes", f"Graph returns every mapped source in user lists: {shown}")
    problems, fixes = [], set()
    for field, source in mapping.items():
        failure = _user_list_refused(graph, [*USER_COLUMNS[:1], source])
        if failure is None:
            continue
        problems.append(f"[attributes] {attributes.key_of(field)} = {source!r}: {failure[0]}")
        fixes.add(failure[1])
    if not problems:  # only together (unlikely): report what Graph said of the whole selection
        failure = _user_list_refused(graph, columns)
        problems, fixes = [f"$select={','.join(select_names(columns))}: {failure[0]}"], {failure[1]}
    return CheckResult.fail("attributes", "; ".join(problems), "; ".join(sorted(fixes)))


def _user_list_refused(graph: GraphClient, columns: list[str]) -> tuple[str, str] | None:
    """None if Graph lists a user with these columns selected, else (what went wrong, the fix)."""
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
