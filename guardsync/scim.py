"""Client of the Atlassian user-provisioning SCIM API (the only code that talks to it).

Three rules hold here so that no caller has to think about them:

- Dry-run is enforced in the transport: with `dry_run=True` every non-GET request
  raises before anything is sent, so no code path can write by accident.
- HTTP answers are mapped to guardsync.errors once, in `_parse_or_raise`; 429, 5xx and
  connection trouble are retried inside the client, within `max_retry_seconds`.
- The API key lives only in the Authorization header of each request: it is not an
  attribute anyone prints, and no exception, log line or repr carries it.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections import Counter
from contextlib import nullcontext
from typing import Any, Callable, Iterator

import requests

from guardsync.errors import ApiError, AuthError, ConfigError, Conflict, GuardsyncError, NotFound, TransientError
from guardsync.httpclient import BACKOFF_CAP, environment_session, full_jitter, never_connected, retry_after, secret_header  # noqa: F401 (BACKOFF_CAP: the retry tests read it here)
from guardsync.models import DesiredUser
from guardsync.throttle import AdaptiveLimit

log = logging.getLogger(__name__)

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
PAGE_SIZE = 100  # Atlassian serves at most 100 a page
MEMBER_CHANGES_PER_PATCH = 100  # at most 100 members an operation, and we pack 100 changes a request
TIMEOUT = (10.0, 60.0)  # connect, read (seconds)

EXPIRED_KEY_ADVICE = (
    "Atlassian refused the SCIM API key (401): API keys expire after one year; regenerate it in "
    "Atlassian Administration > Security > Identity providers > your directory, and update atlassian.api_key"
)

_ID_IN_PATH = re.compile(r"^/(Users|Groups)/[^/?]+")


def endpoint_key(method: str, path: str) -> str:
    """'PATCH /Groups/{id}' for 'PATCH /Groups/8f3c...': the key requests are counted under."""
    path = path.split("?", 1)[0]
    return f"{method} {_ID_IN_PATH.sub(lambda m: f'/{m.group(1)}/{{id}}', path)}"


def escape_filter_value(value: str) -> str:
    """Quote a value for a SCIM filter as a JSON string (RFC 7644 §3.4.2.2 takes JSON string syntax):
    quote and backslash escaped, and control characters too (a raw newline or U+001F is a syntax error)."""
    return json.dumps(value, ensure_ascii=False)


ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
# DesiredUser field -> (SCIM attribute, type) of the attributes sent as they are; names, phone numbers
# and the enterprise extension (Atlassian keeps only department and organization there) are below.
_CORE_TEXT = {"display_name": "displayName", "title": "title", "preferred_language": "preferredLanguage",
              "timezone": "timezone", "nick_name": "nickName"}
_NAME_PARTS = {"given_name": "givenName", "family_name": "familyName"}
_PHONE_TYPES = {"phone_work": "work", "phone_mobile": "mobile"}
_ENTERPRISE = {"department": "department", "organization": "organization"}


def user_resource(user: DesiredUser) -> dict:
    """The full SCIM representation of a user (PUT clears what is left out, so send everything).

    An empty attribute is left out rather than sent as "": Atlassian and scim2 treat a missing
    attribute as cleared, and some validators refuse empty strings. user_from_resource is the inverse.
    """
    resource: dict[str, Any] = {
        "schemas": [CORE_USER],
        "userName": user.user_name,
        "emails": [{"value": user.user_name, "type": "work", "primary": True}],
        "active": user.active,
    }
    if user.external_id:  # "" only for an account released by its user: no Entra id is its now
        resource["externalId"] = user.external_id
    resource.update((scim, getattr(user, field)) for field, scim in _CORE_TEXT.items() if getattr(user, field))
    name = {scim: getattr(user, field) for field, scim in _NAME_PARTS.items() if getattr(user, field)}
    if name:
        resource["name"] = name
    phones = [{"value": getattr(user, field), "type": kind} for field, kind in _PHONE_TYPES.items() if getattr(user, field)]
    if phones:
        resource["phoneNumbers"] = phones
    enterprise = {scim: getattr(user, field) for field, scim in _ENTERPRISE.items() if getattr(user, field)}
    if enterprise:
        resource["schemas"].append(ENTERPRISE_USER)
        resource[ENTERPRISE_USER] = enterprise
    return resource


def user_from_resource(resource: dict) -> dict:
    """The DesiredUser fields of a SCIM user as guardsync records them (pure; user_resource's inverse).

    An attribute Atlassian does not hold reads as "", as guardsync records an attribute it does not
    send. A primary email that differs from userName (edited by hand) shows in user_name, so that the
    record differs from any desired one and the plan writes the user again.
    """
    emails = resource.get("emails") or []
    primary = next((e.get("value") for e in emails if e.get("primary")), emails[0].get("value") if emails else None)
    user_name = resource.get("userName") or ""
    if primary != user_name:
        user_name = f"{user_name} <{primary}>"
    name = resource.get("name") or {}
    enterprise = resource.get(ENTERPRISE_USER) or {}
    phones: dict[str, str] = {}
    for phone in resource.get("phoneNumbers") or []:
        phones.setdefault(phone.get("type") or "", phone.get("value") or "")  # the first of each type
    fields = {
        "external_id": resource.get("externalId") or "",
        "user_name": user_name,
        "active": bool(resource.get("active", True)),
    }
    fields.update((field, resource.get(scim) or "") for field, scim in _CORE_TEXT.items())
    fields.update((field, name.get(scim) or "") for field, scim in _NAME_PARTS.items())
    fields.update((field, phones.get(kind, "")) for field, kind in _PHONE_TYPES.items())
    fields.update((field, enterprise.get(scim) or "") for field, scim in _ENTERPRISE.items())
    return fields


class ScimClient:
    """Users and groups of one Atlassian SCIM directory. Thread-safe (one session per thread)."""

    def __init__(self, scim_url: str, api_key: str, *, dry_run: bool = False, max_retry_seconds: float = 120.0,
                 read_timeout: float | None = None):
        self.scim_url = scim_url.rstrip("/")
        # Requests in flight at once (set by the loader), held only while a request is out: a
        # thread waiting out a Retry-After does not hold one.
        self.limit: AdaptiveLimit | None = None
        self._reached = False  # has any answer come back yet
        self.dry_run = dry_run
        self.max_retry_seconds = max_retry_seconds  # how long one request may be retried ([sync] retry_budget_seconds)
        self.timeout = (TIMEOUT[0], read_timeout) if read_timeout else TIMEOUT
        self.requests_made: Counter[str] = Counter()  # endpoint_key -> HTTP requests sent, retries included
        self._counter_lock = threading.Lock()
        self._local = threading.local()
        # Kept in a closure, not an attribute, so vars()/repr()/a debugger dump of the client shows no key.
        self._authorization = secret_header(api_key)

    def __repr__(self) -> str:
        return f"ScimClient({self.scim_url!r}, dry_run={self.dry_run})"

    # -- users ---------------------------------------------------------------
    def find_user(self, external_id: str | None = None, user_name: str | None = None) -> dict | None:
        """The user with this externalId (case-sensitive) or userName (case-insensitive), else None.

        externalId is not unique in Atlassian; if several match, the first is returned.
        """
        if (external_id is None) == (user_name is None):
            raise ValueError("find_user takes exactly one of external_id, user_name")
        attribute, value = ("externalId", external_id) if external_id is not None else ("userName", user_name)
        return self._find("/Users", attribute, value)

    def find_account(self, user: DesiredUser) -> dict | None:
        """The account a user would be matched with, as the planner adopts: by userName, else by externalId."""
        return self.find_user(user_name=user.user_name) or (
            self.find_user(external_id=user.external_id) if user.external_id else None)

    def get_user(self, scim_id: str) -> dict:
        return self._call("GET", f"/Users/{scim_id}")

    def create_user(self, user: DesiredUser) -> dict:
        # A POST whose answer was lost may have been applied: before each retry, look the
        # user up by externalId and return it if it is there, so a retry never duplicates.
        # (Should the lookup miss it, the retried POST gets 409 -> Conflict: the caller adopts.)
        return self._call(
            "POST", "/Users", body=user_resource(user),
            already_done=lambda: self.find_user(external_id=user.external_id),
        )

    def replace_user(self, scim_id: str, user: DesiredUser) -> dict:
        return self._call("PUT", f"/Users/{scim_id}", body=user_resource(user))

    def iter_users(self) -> Iterator[dict]:
        return self._iter("/Users")

    # -- groups --------------------------------------------------------------
    def find_group(self, display_name: str) -> dict | None:
        """The group with this displayName (case-insensitive), else None."""
        return self._find("/Groups", "displayName", display_name)

    def get_group(self, scim_id: str) -> dict:
        return self._call("GET", f"/Groups/{scim_id}")

    def create_group(self, display_name: str, external_id: str) -> dict:
        # Same guard as create_user: a retried POST first looks for the group by name.
        body = {"schemas": [CORE_GROUP], "displayName": display_name, "externalId": external_id}
        return self._call("POST", "/Groups", body=body, already_done=lambda: self.find_group(display_name))

    def set_group_external_id(self, scim_id: str, external_id: str) -> None:
        """Mark an adopted group as ours (externalId = the Entra group id); its name stays."""
        operation = {"op": "replace", "path": "externalId", "value": external_id}
        self._call("PATCH", f"/Groups/{scim_id}", body={"schemas": [PATCH_OP], "Operations": [operation]})

    def delete_group(self, scim_id: str) -> None:
        self._call("DELETE", f"/Groups/{scim_id}")

    def iter_groups(self) -> Iterator[dict]:
        return self._iter("/Groups")

    def patch_members(self, group_scim_id: str, add: list[str], remove: list[str]) -> int:
        """Add and remove members, up to 100 changes a PATCH request; returns the number of requests.

        Removal uses the RFC 7644 form `members[value eq "id"]`, one operation per member:
        a bare `remove` on path "members" with a value list is a vendor extension that a
        strict server reads as "remove every member".
        """
        changes = [("add", i) for i in add] + [("remove", i) for i in remove]
        requests_sent = 0
        for start in range(0, len(changes), MEMBER_CHANGES_PER_PATCH):
            chunk = changes[start : start + MEMBER_CHANGES_PER_PATCH]
            body = {"schemas": [PATCH_OP], "Operations": _member_operations(chunk)}
            self._call("PATCH", f"/Groups/{group_scim_id}", body=body)
            requests_sent += 1
        return requests_sent

    # -- reading helpers -----------------------------------------------------------
    def _find(self, endpoint: str, attribute: str, value: str) -> dict | None:
        params = {"filter": f"{attribute} eq {escape_filter_value(value)}"}
        found = self._call("GET", endpoint, params=params).get("Resources") or []
        return found[0] if found else None

    def _iter(self, endpoint: str) -> Iterator[dict]:
        start = 1
        while True:
            page = self._call("GET", endpoint, params={"startIndex": start, "count": PAGE_SIZE})
            resources = page.get("Resources") or []
            yield from resources
            start += len(resources)
            if not resources or start > int(page.get("totalResults", 0)):
                return

    # -- transport -------------------------------------------------------------------
    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: dict | None = None,
        already_done: Callable[[], dict | None] | None = None,
    ) -> dict:
        """Send one request, retrying transient failures; the parsed JSON body ({} if none)."""
        if self.dry_run and method != "GET":
            raise GuardsyncError(f"dry-run: refused {method} {path}")
        deadline = time.monotonic() + self.max_retry_seconds
        for attempt in itertools.count():
            response, failure, retry_after = self._attempt(method, path, params, body)
            if response is not None:
                return self._parse_or_raise(method, path, response)
            delay = retry_after if retry_after is not None else full_jitter(attempt)
            if time.monotonic() + delay > deadline:
                raise TransientError(
                    f"Atlassian SCIM {method} {path} failed {attempt + 1} time(s), last with {failure}; "
                    f"waiting {delay:.0f}s more would exceed the retry budget of {self.max_retry_seconds:.0f}s "
                    "([sync] retry_budget_seconds); try again later, or raise the budget",
                    retry_after=retry_after,  # the server's ask, not our backoff: a task retry waits it out
                )
            if failure.startswith("429") and self.limit is not None:
                self.limit.throttled()  # fewer requests in flight from now on
            log.info("SCIM %s %s: %s; retrying in %.1fs", method, path, failure, delay)
            _pause(delay)
            # A 429 was refused before being applied; anything else may have been applied.
            if already_done is not None and not failure.startswith("429"):
                existing = already_done()
                if existing is not None:
                    return existing
        raise AssertionError("unreachable")

    def _attempt(self, method, path, params, body) -> tuple[requests.Response | None, str, float | None]:
        """One HTTP exchange: (response, "", None) if final, else (None, what failed, Retry-After)."""
        self._count(method, path)
        try:
            response = self._session().request(  # its _SlotAdapter holds an in-flight slot for the exchange
                method, self.scim_url + path, params=params, json=body, timeout=self.timeout,
                headers=self._authorization(),
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            if (config_error := self._not_retryable(exc)) is not None:
                raise config_error from None
            if not self._reached and never_connected(exc):  # a wrong URL, not worth minutes of retries
                raise ConfigError(f"[atlassian] scim_url {self.scim_url} cannot be reached ({type(exc).__name__}): "
                                  "check the URL and that this host may connect to it") from None
            # The message names host and reason; requests never puts headers in it.
            return None, f"{type(exc).__name__}: {exc}", None
        self._reached = True
        if response.status_code == 429 or response.status_code >= 500:
            return None, f"{response.status_code} {_scim_detail(response)}", retry_after(response)
        if self.limit is not None:
            self.limit.succeeded()
        return response, "", None

    def _not_retryable(self, exc: requests.RequestException) -> ConfigError | None:
        """A certificate that does not verify will not heal by retrying (SSLError is a ConnectionError,
        so it would otherwise be retried for minutes): say how to trust it."""
        if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            host = requests.utils.urlparse(self.scim_url).netloc
            return ConfigError(
                f"[atlassian] scim_url: TLS verification of {host} failed: if a proxy or private CA signs its "
                "certificate, set REQUESTS_CA_BUNDLE to that CA's PEM file (verification is never turned off)"
            )
        return None

    @staticmethod
    def _parse_or_raise(method: str, path: str, response: requests.Response) -> dict:
        """The one place HTTP answers become guardsync errors."""
        status = response.status_code
        if status < 400:
            return response.json() if response.content else {}
        if status == 401:
            raise AuthError(EXPIRED_KEY_ADVICE)
        detail, scim_type = _scim_error(response)
        message = f"Atlassian SCIM refused {method} {path} ({status}"
        message += f", scimType {scim_type}): {detail}" if scim_type else f"): {detail}"
        error_type = {404: NotFound, 409: Conflict}.get(status, ApiError)
        raise error_type(message, status=status, code=scim_type)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = environment_session(self.scim_url)  # REQUESTS_CA_BUNDLE and proxies honoured
            session.mount(self.scim_url, _SlotAdapter(self))
            session.headers.update({"Accept": "application/scim+json, application/json"})
            self._local.session = session
        return session

    def _count(self, method: str, path: str) -> None:
        with self._counter_lock:
            self.requests_made[endpoint_key(method, path)] += 1


class _SlotAdapter(requests.adapters.HTTPAdapter):
    """Holds one of the client's in-flight slots (`client.limit`) for the HTTP exchange alone.

    requests' own work around the exchange (cookies, hooks, the redirect check) then runs
    outside the slot, which stays busy only while a request is out at Atlassian
    (bench.floor, 4 in flight: 1.106x the latency a request with the slot around
    Session.send, 1.089x with it here).
    """

    def __init__(self, client: ScimClient):
        super().__init__()
        self._client = client

    def send(self, request, *args, **kwargs):
        limit = self._client.limit  # the loader sets a fresh one each stage
        with limit.slot() if limit is not None else nullcontext():
            return super().send(request, *args, **kwargs)


def _member_operations(chunk: list[tuple[str, str]]) -> list[dict]:
    added = [{"value": member} for op, member in chunk if op == "add"]
    operations = [{"op": "add", "path": "members", "value": added}] if added else []
    operations += [
        {"op": "remove", "path": f"members[value eq {escape_filter_value(member)}]"}
        for op, member in chunk
        if op == "remove"
    ]
    return operations


def _pause(seconds: float) -> None:
    time.sleep(seconds)  # a function of its own so tests can see the delays without waiting


def _scim_error(response: requests.Response) -> tuple[str, str | None]:
    """Atlassian's own words: (detail, scimType) of a SCIM error body, else the raw text."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:300] or response.reason or "no detail"), None
    if not isinstance(body, dict):
        return str(body)[:300], None
    detail = body.get("detail") or body.get("message") or str(body)[:300]
    return f"{detail} (status {body.get('status', response.status_code)})", body.get("scimType")


def _scim_detail(response: requests.Response) -> str:
    return _scim_error(response)[0]


# == guardsync check: the SCIM probe ===============================================================


def check_directory(scim: ScimClient, key_reference: str):
    """The "atlassian" line: one `GET /Users?count=1` (give a dry-run client: it cannot write) proves the URL and key."""
    from guardsync.models import CheckResult  # imported here: this section stands alone

    try:
        page = scim._call("GET", "/Users", params={"startIndex": 1, "count": 1})
    except AuthError as exc:
        return CheckResult.fail("atlassian", str(exc), "in Atlassian Administration > Security > Identity providers > "
                                "your directory, regenerate the API key and store it where atlassian.api_key points "
                                f"({key_reference})")
    except NotFound as exc:
        return CheckResult.fail("atlassian", str(exc), "copy the directory's SCIM base URL from Atlassian "
                                "Administration > Security > Identity providers > your directory into atlassian.scim_url")
    except TransientError as exc:
        return CheckResult.fail("atlassian", str(exc), f"check that {scim.scim_url} is reachable from here (proxy: "
                                "HTTPS_PROXY; private CA: REQUESTS_CA_BUNDLE) and run guardsync check again")
    except GuardsyncError as exc:
        return CheckResult.fail("atlassian", str(exc), "check atlassian.scim_url: it is the directory's SCIM base URL, "
                                "https://api.atlassian.com/scim/directory/DIRECTORY_ID")
    total = page.get("totalResults", "?") if isinstance(page, dict) else "?"
    return CheckResult.ok("atlassian", f"{scim.scim_url} answers and accepts the API key; the directory holds {total} users")
