"""A local Microsoft Graph and Entra login authority serving a live Tenant over HTTPS.

It speaks what guardsync and msal use, the way the real services do: OpenID
discovery and the client-credentials token endpoint (client secret or a certificate
assertion), then Graph v1.0 reads with $select, $top and @odata.nextLink paging,
with Graph's error bodies. One host serves both, so `authority_host` and
`graph_url` are the same base URL.

Paging is cheap at any size: the first page of a listing takes a snapshot (a list of
references) and the opaque $skiptoken is that snapshot's id and an offset into it.

Delta queries (/users/delta, /groups/delta) read the Tenant's change log: a deltaLink
holds the sequence number it was issued at, so a round with few changes costs what
changed, not the tenant's size; `expire_delta_links()` makes every older link answer
as Graph does for an expired token. See the "delta" section of GraphEmulator.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from urllib.parse import quote, urlencode

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from guardsync.sandbox.http import SandboxCA, SandboxServer
from guardsync.sandbox.tenant import EXTENSION_ATTRIBUTES, PROPERTY_PERMISSIONS, SINGLE_USER_PROPERTIES, Tenant

ODATA_PREFIX = "#microsoft.graph."
DEFAULT_USER_SELECT = ("id", "displayName", "givenName", "surname", "jobTitle", "mail", "userPrincipalName")
GROUP_KEYS = ("id", "displayName")
DOMAIN_KEYS = ("id", "authenticationType", "isDefault", "isInitial", "isRoot", "isVerified")
ORGANIZATION_KEYS = ("id", "displayName", "tenantType", "verifiedDomains")
QUERY_OPTIONS = {"$select", "$top", "$skiptoken"}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RULE_ARGUMENT = re.compile(r"<(?:[^:>]+:)?(?P<name>[^>]+)>")  # "<id>" in a rule, shown as "{id}"
SNAPSHOTS_KEPT = 256  # paged listings in flight; the oldest is forgotten first


class GraphFailure(Exception):
    """A Graph error answer: {"error": {"code": ..., "message": ...}}."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LoginFailure(Exception):
    """An Entra login error answer: {"error": ..., "error_description": "AADSTS...: ..."}."""

    def __init__(self, status: int, error: str, aadsts: int, description: str):
        super().__init__(description)
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description


class GraphEmulator(SandboxServer):
    ROUTES = Map(
        [
            Rule("/<tenant>/v2.0/.well-known/openid-configuration", endpoint="openid_configuration", methods=["GET"]),
            Rule("/<tenant>/oauth2/v2.0/token", endpoint="token", methods=["POST"]),
            Rule("/v1.0/users", endpoint="users", methods=["GET"]),
            Rule("/v1.0/groups", endpoint="groups", methods=["GET"]),
            Rule("/v1.0/users/delta", endpoint="users_delta", methods=["GET"]),
            Rule("/v1.0/groups/delta", endpoint="groups_delta", methods=["GET"]),
            Rule("/v1.0/groups/<id>/members", endpoint="members", methods=["GET"]),
            Rule("/v1.0/groups/<id>/transitiveMembers", endpoint="transitive_members", methods=["GET"]),
            Rule("/v1.0/domains", endpoint="domains", methods=["GET"]),
            Rule("/v1.0/organization", endpoint="organization", methods=["GET"]),
        ],
        strict_slashes=False,
    )

    def __init__(self, tenant: Tenant, ca: SandboxCA, latency: float = 0.0):
        super().__init__(self._app, ca, latency)
        self.tenant = tenant
        self.expires_in = 3599  # what token answers announce
        self.token_lifetime: float | None = None  # how long tokens really work; None = expires_in
        # Application permissions admin-consented to the app: the `roles` claim of issued tokens (remove one to test).
        self.granted_roles = ["User.Read.All", "GroupMember.Read.All", "Domain.Read.All", "Organization.Read.All"]
        self._token_key = secrets.token_bytes(32)  # signs tokens (HS256); clients never verify them, Graph here does not either
        self.rejected_tokens = 0  # Graph calls refused for a missing, unknown or expired token
        self._tokens: dict[str, float] = {}  # access token -> monotonic expiry
        self._snapshots: OrderedDict[str, list] = OrderedDict()
        self._snapshot_ids = itertools.count(1)
        self.delta_page_objects = self.DELTA_PAGE_OBJECTS  # delta page caps; tests lower them to force paging
        self.delta_page_links = self.DELTA_PAGE_LINKS
        self._delta_rounds: OrderedDict[str, dict] = OrderedDict()  # delta rounds with pages still to serve
        self._delta_round_ids = itertools.count(1)
        self._delta_generation = 0  # links from an older generation are expired (expire_delta_links)
        self._links_issued = itertools.count(1)  # every deltaLink differs, as Graph's do
        self._delta_expiry = (410, "syncStateNotFound")  # what an expired delta link answers
        self._state_lock = threading.Lock()

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def graph_url(self) -> str:
        return self.base_url

    def revoke_tokens(self) -> None:
        """Forget every issued token: the next Graph call with one gets 401."""
        with self._state_lock:
            self._tokens.clear()

    def endpoint_of(self, request: Request) -> str:
        try:
            rule, _ = self.ROUTES.bind_to_environ(request.environ).match(return_rule=True)
        except HTTPException:
            return f"{request.method} {request.path}"
        pattern = RULE_ARGUMENT.sub(lambda m: "{" + m["name"] + "}", rule.rule)
        return f"{request.method} {pattern}"

    # -- dispatch --------------------------------------------------------------
    def _app(self, environ, start_response):
        request = Request(environ)
        try:
            endpoint, args = self.ROUTES.bind_to_environ(environ).match()
            response = getattr(self, f"_on_{endpoint}")(request, **args)
        except GraphFailure as failure:
            response = _graph_error(failure)
        except LoginFailure as failure:
            response = _login_error(failure)
        except NotFound:
            response = _graph_error(GraphFailure(404, "Request_ResourceNotFound", f"Resource not found for the segment '{request.path}'."))
        except MethodNotAllowed:
            response = _graph_error(GraphFailure(405, "Request_BadRequest", f"{request.method} is not supported here."))
        return response(environ, start_response)

    # -- login authority ---------------------------------------------------------
    def _on_openid_configuration(self, request: Request, tenant: str) -> Response:
        self._require_tenant(tenant)
        base, tid = self.base_url, self.tenant.tenant_id
        return _json(
            {
                "issuer": f"{base}/{tid}/v2.0",
                "authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/{tid}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/{tid}/oauth2/v2.0/logout",
                "jwks_uri": f"{base}/{tid}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            }
        )

    def _on_token(self, request: Request, tenant: str) -> Response:
        self._require_tenant(tenant)
        form = request.form
        if form.get("grant_type") != "client_credentials":
            raise LoginFailure(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id") or (request.authorization.username if request.authorization else None)
        if client_id != self.tenant.client_id:
            raise LoginFailure(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory '{self.tenant.organization}'.",
            )
        self._check_client_credential(request)
        if not form.get("scope", "").endswith("/.default"):
            raise LoginFailure(400, "invalid_scope", 1002012, "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.")
        lifetime = self.token_lifetime if self.token_lifetime is not None else self.expires_in
        issued = int(time.time())
        token = jwt.encode(  # shaped like an Entra v1 app token for Graph; `uti` makes each one unique
            {
                "aud": self.graph_url, "iss": f"https://sts.windows.net/{self.tenant.tenant_id}/",
                "iat": issued, "nbf": issued, "exp": issued + max(1, round(lifetime)),
                "appid": self.tenant.client_id, "idtyp": "app", "oid": self.tenant.client_id,
                "sub": self.tenant.client_id, "tid": self.tenant.tenant_id, "roles": list(self.granted_roles),
                "uti": secrets.token_urlsafe(16), "ver": "1.0",
            },
            self._token_key, algorithm="HS256",
        )
        with self._state_lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}  # forget the dead
            self._tokens[token] = now + lifetime
        return _json({"token_type": "Bearer", "expires_in": self.expires_in, "ext_expires_in": self.expires_in, "access_token": token})

    def _check_client_credential(self, request: Request) -> None:
        form = request.form
        if form.get("client_assertion"):
            if form.get("client_assertion_type") != JWT_BEARER:
                raise LoginFailure(400, "invalid_request", 90014, "The request body must contain client_assertion_type.")
            self._check_assertion(form["client_assertion"])
            return
        secret = form.get("client_secret") or (request.authorization.password if request.authorization else None)
        if not secret:
            raise LoginFailure(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        if not secrets.compare_digest(secret, self.tenant.client_secret):
            raise LoginFailure(
                401, "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                f"value, not the client secret ID, for a secret added to app '{self.tenant.client_id}'.",
            )

    def _check_assertion(self, assertion: str) -> None:
        """Verify a certificate assertion as Entra does: known key, signature, iss/sub, audience, lifetime."""
        if not self.tenant.certificate_pem:
            raise LoginFailure(401, "invalid_client", 700027, "Client assertion failed signature validation: the app has no certificate credential.")
        certificate = x509.load_pem_x509_certificate(self.tenant.certificate_pem)
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise LoginFailure(400, "invalid_request", 50027, "The client assertion is not a well-formed JWT.") from None
        if header.get("x5t") and header["x5t"].rstrip("=") != _b64url(certificate.fingerprint(hashes.SHA1())):
            raise LoginFailure(401, "invalid_client", 700027, "Client assertion failed signature validation: the key was not found (x5t does not match a registered certificate).")
        try:
            claims = jwt.decode(
                assertion,
                certificate.public_key(),
                algorithms=["RS256", "PS256"],
                options={"require": ["exp", "aud", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise LoginFailure(401, "invalid_client", 700024, "Client assertion is not within its valid time range.") from None
        except jwt.PyJWTError as exc:
            raise LoginFailure(401, "invalid_client", 700027, f"Client assertion failed signature validation ({exc}).") from None
        if claims["iss"] != self.tenant.client_id or claims["sub"] != self.tenant.client_id:
            raise LoginFailure(401, "invalid_client", 700021, "Client assertion application identifier doesn't match 'client_id' parameter.")
        if not str(claims["aud"]).endswith("/oauth2/v2.0/token"):
            raise LoginFailure(401, "invalid_client", 700212, "The client assertion audience is not the token endpoint.")

    def _require_tenant(self, name: str) -> None:
        if not self.tenant.knows_tenant(name):
            raise LoginFailure(
                400, "invalid_request", 90002,
                f"Tenant '{name}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
            )

    # -- Graph -------------------------------------------------------------------
    def _on_users(self, request: Request) -> Response:
        self._authenticate(request)
        return self._listing(request, "user", self._user_keys(request), DEFAULT_USER_SELECT, lambda: list(self.tenant.users.values()))

    def _user_keys(self, request: Request) -> frozenset[str]:
        """The user properties a list or delta round may $select, as Graph answers the others:
        a property only a single-user GET returns fails the request (Graph answers 501
        NotImplemented, github.com/microsoftgraph/microsoft-graph-docs-contrib/issues/5637), one
        whose permission the app lacks is refused (403); unknown ones get 400 in _selection."""
        chosen = {name.strip() for name in (request.args.get("$select") or "").split(",")}
        if chosen & set(SINGLE_USER_PROPERTIES):
            raise GraphFailure(501, "NotImplemented", "This operation target is not yet supported.")
        for name in sorted(chosen & set(PROPERTY_PERMISSIONS)):
            if PROPERTY_PERMISSIONS[name] not in self.granted_roles:
                raise GraphFailure(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
        return self.tenant.user_properties

    def _on_groups(self, request: Request) -> Response:
        self._authenticate(request)
        return self._listing(request, "group", GROUP_KEYS, GROUP_KEYS, lambda: list(self.tenant.groups.values()))

    def _on_members(self, request: Request, id: str) -> Response:
        self._authenticate(request)
        return self._listing(request, "directoryObject", self._user_keys(request), DEFAULT_USER_SELECT, lambda: self._direct_members(id))

    def _on_transitive_members(self, request: Request, id: str) -> Response:
        self._authenticate(request)
        return self._listing(request, "directoryObject", self._user_keys(request), DEFAULT_USER_SELECT, lambda: self._transitive_members(id))

    def _on_domains(self, request: Request) -> Response:
        self._authenticate(request)
        return self._listing(request, "domain", DOMAIN_KEYS, DOMAIN_KEYS, lambda: [_domain(d) for d in self.tenant.domains])

    def _on_organization(self, request: Request) -> Response:
        self._authenticate(request)
        return self._listing(request, "organization", ORGANIZATION_KEYS, ORGANIZATION_KEYS, lambda: [self._organization()])

    def _authenticate(self, request: Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        with self._state_lock:
            expiry = self._tokens.get(token) if scheme.lower() == "bearer" else None
            if expiry is not None and expiry > time.monotonic():
                return
            self.rejected_tokens += 1
        message = (
            "Access token is empty." if not token
            else "Lifetime validation failed, the token is expired." if expiry is not None
            else "Access token validation failure. Invalid audience."
        )
        raise GraphFailure(401, "InvalidAuthenticationToken", message)

    def _listing(self, request: Request, type_name: str, keys, default_select, take_snapshot) -> Response:
        """One page of a collection: validate the query, page through a snapshot, project $select."""
        args = request.args
        unsupported = set(args) - QUERY_OPTIONS
        if unsupported:
            raise GraphFailure(400, "Request_UnsupportedQuery", f"Unsupported query option(s): {', '.join(sorted(unsupported))}.")
        top = _page_size(args.get("$top"))
        select = _selection(args.get("$select"), keys, default_select, type_name)
        if "$skiptoken" in args:
            snapshot_id, offset, objects = self._resume(args["$skiptoken"])
        else:
            with self.tenant.lock:
                objects = take_snapshot()
            snapshot_id, offset = None, 0
        page = objects[offset : offset + top]
        body = {
            "@odata.context": f"{self.graph_url}/v1.0/$metadata#{type_name}s",
            "value": [_project(obj, select) for obj in page],
        }
        if offset + top < len(objects):
            snapshot_id = snapshot_id or self._keep(objects)
            body["@odata.nextLink"] = self._next_link(request, snapshot_id, offset + top)
        return _json(body)

    def _direct_members(self, group_id: str) -> list[tuple[dict, str]]:
        if group_id not in self.tenant.groups:
            raise GraphFailure(404, "Request_ResourceNotFound", f"Resource '{group_id}' does not exist or one of its queried reference-property objects are not present.")
        return [self._directory_object(m) for m in self.tenant.members.get(group_id, [])]

    def _transitive_members(self, group_id: str) -> list[tuple[dict, str]]:
        """Every object reachable through nesting, each once; cycles end where they meet themselves."""
        if group_id not in self.tenant.groups:
            raise GraphFailure(404, "Request_ResourceNotFound", f"Resource '{group_id}' does not exist or one of its queried reference-property objects are not present.")
        seen, queue, found = {group_id}, [group_id], []
        while queue:
            for member_id in self.tenant.members.get(queue.pop(), []):
                if member_id in seen:
                    continue
                seen.add(member_id)
                found.append(self._directory_object(member_id))
                if member_id in self.tenant.groups:
                    queue.append(member_id)
        return found

    def _directory_object(self, object_id: str) -> tuple[dict, str]:
        """A member and its type name: users and groups as stored, others as bare ids."""
        kind = self.tenant.type_of(object_id)
        if kind == "user":
            return self.tenant.users[object_id], kind
        if kind == "group":
            return self.tenant.groups[object_id], kind
        return {"id": object_id}, kind

    def _organization(self) -> dict:
        return {
            "id": self.tenant.tenant_id,
            "displayName": self.tenant.organization,
            "tenantType": "AAD",
            "verifiedDomains": [
                {"name": d["id"], "isDefault": d["isDefault"], "isInitial": d["isInitial"], "type": "Managed"}
                for d in self.tenant.domains
                if d["isVerified"]
            ],
        }

    # -- delta ---------------------------------------------------------------------
    # /users/delta and /groups/delta as Graph serves them. The initial round returns every
    # object (groups with their members in members@delta); a deltaLink carries the Tenant's
    # change-log sequence number it was issued at, and following it returns exactly the
    # objects changed since: users as they are now (a property never set is left out, one
    # written in the window is there even if null), @removed for deleted ones; groups with
    # the members added since, and removed ones with "@removed": {"reason": "deleted"}.
    # Page size: Graph ignores $top on user and group delta (it is "not supported"), and so
    # does this; the page size is asked for with `Prefer: odata.maxpagesize=N` (answered
    # with Preference-Applied), capped at 200 objects and 500 member entries a page
    # (learn.microsoft.com/en-us/answers/a/2052165). A group with more members than the
    # page has room for continues on the next page, repeated with the rest of its members.
    DELTA_PAGE_OBJECTS = 200
    DELTA_PAGE_LINKS = 500
    DELTA_ROUNDS_KEPT = 64
    DELTA_OPTIONS = {"$select", "$deltatoken", "$skiptoken", "$top"}
    GROUP_DELTA_KEYS = ("id", "displayName", "members")
    EXPIRED_DELTA_MESSAGE = "The sync state generation is not found. The delta token is expired and data must be synchronized again."

    def expire_delta_links(self, status: int = 410, code: str = "syncStateNotFound") -> None:
        """Expire every deltaLink and nextLink issued so far: they answer `status` with error `code`
        (Graph: 410 Gone on a sync reset, or syncStateNotFound / resyncRequired for an expired token)."""
        with self._state_lock:
            self._delta_generation += 1
            self._delta_expiry = (status, code)
            self._delta_rounds.clear()

    def _on_users_delta(self, request: Request) -> Response:
        self._authenticate(request)
        return self._delta(request, "user")

    def _on_groups_delta(self, request: Request) -> Response:
        self._authenticate(request)
        return self._delta(request, "group")

    def _delta(self, request: Request, kind: str) -> Response:
        args = request.args
        unsupported = set(args) - self.DELTA_OPTIONS
        if unsupported:
            raise GraphFailure(400, "Request_UnsupportedQuery", f"Unsupported query option(s): {', '.join(sorted(unsupported))}.")
        objects, links, asked = self._delta_page_size(request)
        if "$skiptoken" in args:
            state = self._delta_state(args["$skiptoken"])
            with self._state_lock:
                round_ = self._delta_rounds.get(state.get("round"))
            if round_ is None or state.get("gen") != self._delta_generation:
                return self._delta_expired(request)
            position = tuple(state["at"])
        elif "$deltatoken" in args:
            if args["$deltatoken"] == "latest":  # "sync from now": no data, a deltaLink at the latest change
                keys, default = (self._user_keys(request), DEFAULT_USER_SELECT) if kind == "user" else (self.GROUP_DELTA_KEYS, self.GROUP_DELTA_KEYS)
                select = _selection(args.get("$select"), keys, default, kind)
                with self.tenant.lock:
                    round_ = {"kind": kind, "select": select, "sequence": self.tenant.sequence, "items": []}
            else:
                state = self._delta_state(args["$deltatoken"])
                if state.get("gen") != self._delta_generation or not 0 <= state.get("seq", -1) <= self.tenant.sequence:
                    return self._delta_expired(request)
                round_ = self._delta_round(kind, tuple(state["select"]), since=state["seq"])
            position = (0, 0)
        else:
            keys, default = (self._user_keys(request), DEFAULT_USER_SELECT) if kind == "user" else (self.GROUP_DELTA_KEYS, self.GROUP_DELTA_KEYS)
            round_ = self._delta_round(kind, _selection(args.get("$select"), keys, default, kind), since=None)
            position = (0, 0)

        if kind == "user":
            offset = position[0]
            page = [self._delta_user(item, round_["select"]) for item in round_["items"][offset : offset + objects]]
            position = (offset + objects, 0)
            done = position[0] >= len(round_["items"])
        else:
            page, position, done = self._delta_group_page(round_, position, objects, links)
        body = {"@odata.context": f"{self.graph_url}/v1.0/$metadata#{kind}s", "value": page}
        if done:
            # Graph hands out a new deltatoken every round, changes or not: "issued" makes each link unique too.
            token = {"gen": self._delta_generation, "seq": round_["sequence"], "select": list(round_["select"]),
                     "issued": next(self._links_issued)}
            body["@odata.deltaLink"] = f"{self.graph_url}{request.path}?$deltatoken={_b64url(json.dumps(token).encode())}"
        else:
            round_id = round_.get("id") or self._keep_delta_round(round_)
            token = {"gen": self._delta_generation, "round": round_id, "at": list(position)}
            body["@odata.nextLink"] = f"{self.graph_url}{request.path}?$skiptoken={_b64url(json.dumps(token).encode())}"
        headers = {"Preference-Applied": f"odata.maxpagesize={min(asked, objects)}"} if asked else None
        return _json(body, headers=headers)

    def _delta_round(self, kind: str, select: tuple[str, ...], since: int | None) -> dict:
        """What one round serves, taken under the tenant lock with the sequence number it reflects.
        Initial round: every object (O(tenant), once). Later rounds: O(changes since)."""
        tenant = self.tenant
        with tenant.lock:
            sequence = tenant.sequence
            if since is None and kind == "user":
                items = list(tenant.users.values())
            elif since is None:
                items = [(gid, group, list(tenant.members.get(gid, ()))) for gid, group in tenant.groups.items()]
            else:
                users, groups = tenant.changes_since(since)
                if kind == "user":
                    items = [(uid, tenant.users.get(uid), written) for uid, written in users.items()]
                else:
                    items = [
                        (gid, tenant.groups.get(gid), [(mid, kind_, added) for mid, (kind_, added) in changes.items()])
                        for gid, changes in groups.items()
                    ]
        return {"kind": kind, "select": select, "sequence": sequence, "items": items}

    @staticmethod
    def _delta_user(item, select) -> dict:
        """A user dict (initial round) or (id, user or None, properties written since)."""
        if isinstance(item, dict):
            user, written = item, ()
        else:
            user_id, user, written = item
            if user is None:
                return {"id": user_id, "@removed": {"reason": "deleted"}}
        entry = {"id": user["id"]}
        entry.update((key, _property(user, key)) for key in select
                     if key != "id" and (user.get(key) is not None or key in written))
        return entry

    def _delta_group_page(self, round_: dict, position: tuple[int, int], objects: int, links: int):
        """Up to `objects` group entries and `links` member entries; a big group is split over pages."""
        items, with_members = round_["items"], "members" in round_["select"]
        index, offset = position
        page, used = [], 0
        while index < len(items) and len(page) < objects:
            group_id, group, members = items[index]
            if group is None:
                page.append({"id": group_id, "@removed": {"reason": "deleted"}})
                index, offset = index + 1, 0
                continue
            entry = {"id": group_id}
            entry.update((key, group[key]) for key in round_["select"] if key in ("displayName",) and group.get(key) is not None)
            if with_members and offset < len(members):
                room = links - used
                if room <= 0:
                    break  # its members start on the next page
                part = members[offset : offset + room]
                entry["members@delta"] = [m for m in map(self._delta_member, part) if m is not None]
                used, offset = used + len(part), offset + len(part)
                page.append(entry)
                if offset < len(members):
                    break  # the rest of this group's members on the next page
            else:
                page.append(entry)
            index, offset = index + 1, 0
        return page, (index, offset), index >= len(items)

    def _delta_member(self, member) -> dict | None:
        """A member id (initial round) or (id, type, added?) from the change log."""
        if isinstance(member, tuple):
            member_id, kind, added = member
            entry = {"@odata.type": ODATA_PREFIX + (kind or "directoryObject"), "id": member_id}
            if not added:
                entry["@removed"] = {"reason": "deleted"}
            return entry
        kind = self.tenant.type_of(member)
        return None if kind is None else {"@odata.type": ODATA_PREFIX + kind, "id": member}  # None: gone since

    def _delta_page_size(self, request: Request) -> tuple[int, int, int | None]:
        match = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", request.headers.get("Prefer", ""), flags=re.I)
        if not match:
            return self.delta_page_objects, self.delta_page_links, None
        asked = max(1, int(match[1]))
        return min(asked, self.delta_page_objects), min(asked, self.delta_page_links), asked

    def _keep_delta_round(self, round_: dict) -> str:
        with self._state_lock:
            round_id = round_["id"] = str(next(self._delta_round_ids))
            self._delta_rounds[round_id] = round_
            while len(self._delta_rounds) > self.DELTA_ROUNDS_KEPT:
                self._delta_rounds.popitem(last=False)
        return round_id

    @staticmethod
    def _delta_state(token: str) -> dict:
        try:
            state = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
            if isinstance(state, dict):
                return state
        except (ValueError, binascii.Error, UnicodeDecodeError):
            pass
        raise GraphFailure(400, "Request_BadRequest", "The delta token or skip token is not valid.")

    def _delta_expired(self, request: Request) -> Response:
        status, code = self._delta_expiry
        response = _graph_error(GraphFailure(status, code, self.EXPIRED_DELTA_MESSAGE))
        if status == 410:  # a sync reset names the initial query to start again from
            response.headers["Location"] = f"{self.graph_url}{request.path}"
        return response

    # -- paging ------------------------------------------------------------------
    def _keep(self, objects: list) -> str:
        with self._state_lock:
            snapshot_id = str(next(self._snapshot_ids))
            self._snapshots[snapshot_id] = objects
            while len(self._snapshots) > SNAPSHOTS_KEPT:
                self._snapshots.popitem(last=False)
        return snapshot_id

    def _resume(self, skiptoken: str) -> tuple[str, int, list]:
        try:
            padded = skiptoken + "=" * (-len(skiptoken) % 4)
            snapshot_id, offset = base64.urlsafe_b64decode(padded.encode()).decode().split(":")
            with self._state_lock:
                return snapshot_id, int(offset), self._snapshots[snapshot_id]
        except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
            raise GraphFailure(400, "Directory_ExpiredPageToken", "The specified page token value has expired and can no longer be included in your request.") from None

    def _next_link(self, request: Request, snapshot_id: str, offset: int) -> str:
        query = {key: value for key, value in request.args.items() if key != "$skiptoken"}
        query["$skiptoken"] = _b64url(f"{snapshot_id}:{offset}".encode())
        return f"{self.graph_url}{request.path}?{urlencode(query, quote_via=quote, safe='$,')}"


# -- helpers ---------------------------------------------------------------------


def _page_size(raw: str | None) -> int:
    if raw is None:
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= 999:
        raise GraphFailure(400, "Request_UnsupportedQuery", f"Invalid page size specified: '{raw}'. Must be between 1 and 999 inclusive.")
    return int(raw)


def _selection(raw: str | None, keys, default_select, type_name: str) -> tuple[str, ...]:
    if raw is None:
        return tuple(default_select)
    chosen = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in chosen if name not in keys]
    if unknown:
        raise GraphFailure(400, "Request_BadRequest", f"Could not find a property named '{unknown[0]}' on type 'microsoft.graph.{type_name}'.")
    return chosen


def _project(obj: dict | tuple[dict, str], select) -> dict:
    """The $select-ed properties; id always, and @odata.type for members (snapshot holds (object, type))."""
    obj, kind = obj if isinstance(obj, tuple) else (obj, None)
    projected = {"@odata.type": ODATA_PREFIX + kind} if kind else {}
    projected["id"] = obj["id"]
    if kind in (None, "user"):
        projected.update((key, _property(obj, key)) for key in select
                         if key != "id" and (obj.get(key) is not None or not key.startswith("extension_")))
    else:
        projected.update((key, obj[key]) for key in select if key in obj and key != "id")
    return projected


def _property(user: dict, key: str):
    """A user property as Graph returns it when selected: null when not set, except that a
    collection reads as [] and onPremisesExtensionAttributes as an object of its 15 attributes
    (learn.microsoft.com/graph/api/resources/onpremisesextensionattributes). A directory
    extension that is not set is left out of the answer (_project)."""
    value = user.get(key)
    if value is None and key in ("businessPhones", "imAddresses", "otherMails", "proxyAddresses"):
        return []
    if key == "onPremisesExtensionAttributes":
        return {**dict.fromkeys(EXTENSION_ATTRIBUTES), **(value or {})}
    return value


def _domain(domain: dict) -> dict:
    return {"authenticationType": "Managed", "isRoot": True, **domain}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers, content_type="application/json")


def _graph_error(failure: GraphFailure) -> Response:
    body = {
        "error": {
            "code": failure.code,
            "message": failure.message,
            "innerError": {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "request-id": secrets.token_hex(16)},
        }
    }
    headers = {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'} if failure.status == 401 else None
    return _json(body, failure.status, headers)


def _login_error(failure: LoginFailure) -> Response:
    trace = secrets.token_hex(16)
    return _json(
        {
            "error": failure.error,
            "error_description": f"AADSTS{failure.aadsts}: {failure.description}\r\nTrace ID: {trace}",
            "error_codes": [failure.aadsts],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": trace,
            "error_uri": "https://login.microsoftonline.com/error?code=" + str(failure.aadsts),
        },
        failure.status,
    )

