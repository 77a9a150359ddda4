"""A local Atlassian Organizations REST API: workspaces, group search, role assignments, over HTTPS.

Tied to the sandbox's SCIM server: its groups are the SCIM server's groups, found by name, under
ids of their own (not the SCIM ids, as in Atlassian); a group deleted over SCIM loses its grants,
and one created again under the same name starts with none.

What is emulated, and how sure it is (checked against Atlassian's reference and jira.js's admin
client, see guardsync/admin.py): the paths and bodies of the seven endpoints guardsync uses; pages
of `data` continued by a cursor in `links.next` (a cursor request carries the cursor alone);
workspaces with `attributes.typeKey`, `hostUrl`, and `capacity`/`usage` where given; 401 for a key
it does not know; 429 with X-RateLimit-Limit/-Remaining/-Reset (ISO 8601) on demand (`throttle`).
Not confirmed, so kept plain here: the error body shape ({"errors": [{"status", "title"}]}), the
status of assign/revoke (204), that a repeated assign succeeds, page sizes (limit honoured up to 100).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from guardsync.admin import endpoint_key
from guardsync.sandbox.http import SandboxCA, SandboxServer
from guardsync.sandbox.scim_server import AtlassianScimServer

MAX_LIMIT = 100
_GROUP_IDS = uuid.UUID("5f0c6f1e-4b1a-4d7e-9a55-8e3d2f7a9c10")  # org-API group ids derive from SCIM ids under this


@dataclass
class SandboxWorkspace:
    id: str
    type_key: str
    host: str
    capacity: int | None = None
    hand_users: int = 0  # seats taken by people outside guardsync's groups (for capacity)


def default_workspaces() -> list[SandboxWorkspace]:
    """Jira and Confluence on the main site, Service Management on two sites (one with few seats), and a
    product with a small capacity."""
    return [
        SandboxWorkspace("ws-jira", "jira-software", "contoso.atlassian.net"),
        SandboxWorkspace("ws-confluence", "confluence", "contoso.atlassian.net", capacity=1000),
        SandboxWorkspace("ws-jsm-main", "jira-servicemanagement", "contoso.atlassian.net"),
        SandboxWorkspace("ws-jsm-support", "jira-servicemanagement", "support-contoso.atlassian.net", capacity=200),
        SandboxWorkspace("ws-jpd", "jira-product-discovery", "contoso.atlassian.net", capacity=5),
    ]


class OrgApiServer(SandboxServer):
    """One organization with one directory (the SCIM server's), served at /admin over HTTPS."""

    def __init__(self, ca: SandboxCA, api_key: str, scim: AtlassianScimServer, org_id: str = "sandbox-org",
                 workspaces: list[SandboxWorkspace] | None = None, latency: float = 0.0):
        self.api_key = api_key
        self.scim = scim
        self.org_id = org_id
        self.workspaces = {w.id: w for w in (workspaces if workspaces is not None else default_workspaces())}
        self._grants: dict[str, set[tuple[str, str]]] = {}  # SCIM group id -> {(workspace id, role)}
        self.directories = [scim.directory_id]  # the org's directories (a test may leave the SCIM one out)
        self._state_lock = threading.Lock()
        self._cursors: dict[str, tuple[list, int]] = {}
        self._throttling: list = [0, re.compile(""), 0.0]  # 429s still to answer, on paths matching, reset in seconds
        self.events: list[tuple[str, str, str, frozenset[str]]] = []  # (assign|revoke, group name, workspace, SCIM group names then)
        o, d, g = "/admin/v2/orgs/<org>", "/directories/<directory>", "/groups/<group>"
        self._routes = Map([
            Rule("/admin/v1/orgs/<org>", methods=["GET"], endpoint="org"),
            Rule(f"{o}/directories", methods=["GET"], endpoint="directories"),
            Rule(f"{o}/workspaces", methods=["POST"], endpoint="workspaces"),
            Rule(f"{o}{d}/groups/search", methods=["POST"], endpoint="search"),
            Rule(f"{o}{d}{g}/role-assignments", methods=["GET"], endpoint="assignments"),
            Rule(f"{o}{d}{g}/role-assignments/assign", methods=["POST"], endpoint="assign"),
            Rule(f"{o}{d}{g}/role-assignments/revoke", methods=["POST"], endpoint="revoke"),
        ])
        super().__init__(self._app, ca, latency=latency)

    def endpoint_of(self, request: Request) -> str:
        return endpoint_key(request.method, request.path)

    # -- inspection and seeding, for tests and the demo ---------------------------------------------
    def group_id_of(self, scim_id: str) -> str:
        return str(uuid.uuid5(_GROUP_IDS, scim_id))

    def grants(self) -> dict[str, set[str]]:
        """Group name -> labels (key@host) of the products it holds with the user role."""
        with self._state_lock:
            self._drop_deleted_groups()
            names = self._group_names_by_scim_id()
            return {names[scim_id]: {self._label(w) for w, role in held if role == "atlassian/user"}
                    for scim_id, held in self._grants.items() if held}

    def grant_by_hand(self, group_name: str, workspace_id: str, role: str = "atlassian/user") -> None:
        """A grant an admin made in Atlassian administration (guardsync did not make it)."""
        scim_id = next(i for i, n in self._group_names_by_scim_id().items() if n.casefold() == group_name.casefold())
        with self._state_lock:
            self._grants.setdefault(scim_id, set()).add((workspace_id, role))

    def revoke_by_hand(self, group_name: str, workspace_id: str, role: str = "atlassian/user") -> None:
        """An admin takes a product away from a group in Atlassian administration."""
        scim_id = next(i for i, n in self._group_names_by_scim_id().items() if n.casefold() == group_name.casefold())
        with self._state_lock:
            self._grants.get(scim_id, set()).discard((workspace_id, role))

    def held(self) -> dict[str, set[str]]:
        """SCIM group id -> the workspace ids it holds with the user role (groups holding nothing left out)."""
        with self._state_lock:
            self._drop_deleted_groups()
            return {scim_id: {w for w, role in held if role == "atlassian/user"}
                    for scim_id, held in self._grants.items() if any(role == "atlassian/user" for _, role in held)}

    def throttle(self, times: int = 1, path_re: str = r"^/admin/", reset_in: float = 0.2) -> None:
        """The next `times` requests whose path matches answer 429 with Atlassian's rate-limit headers
        (X-RateLimit-Reset `reset_in` seconds after the answer; no Retry-After)."""
        with self._state_lock:
            self._throttling = [times, re.compile(path_re), reset_in]

    def writes(self) -> int:
        return sum(n for key, n in self.requests.items() if key.endswith(("/assign", "/revoke")))

    # -- the API -------------------------------------------------------------------------------------
    def _app(self, environ, start_response):
        request = Request(environ)
        response = self._serve(request)
        return response(environ, start_response)

    def _serve(self, request: Request) -> Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized: the API key is not valid")
        with self._state_lock:
            times, path_re, reset_in = self._throttling
            if times > 0 and path_re.search(request.path):
                self._throttling[0] -= 1
                reset = (datetime.now(timezone.utc) + timedelta(seconds=reset_in)).isoformat(timespec="milliseconds")
                answer = _error(429, "Too many requests")
                answer.headers.update({"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
                return answer
        adapter = self._routes.bind("sandbox")
        try:
            endpoint, args = adapter.match(request.path, method=request.method)
        except Exception:  # werkzeug's NotFound / MethodNotAllowed
            return _error(404, f"No such endpoint {request.method} {request.path}")
        if args.get("org") != self.org_id:
            return _error(404, "Organization not found")
        if "directory" in args and (args["directory"] != self.scim.directory_id or args["directory"] not in self.directories):
            return _error(404, "Directory not found")
        body = request.get_json(silent=True) or {}
        with self._state_lock:
            self._drop_deleted_groups()
            return getattr(self, f"_{endpoint}")(request, body, args)

    def _org(self, request, body, args) -> Response:
        return _json({"data": {"id": self.org_id, "type": "orgs", "attributes": {"name": "Sandbox organization"}}})

    def _directories(self, request, body, args) -> Response:
        return self._page([{"directoryId": d, "name": f"Directory {d}"} for d in self.directories], {})

    def _workspaces(self, request, body, args) -> Response:
        items = [self._workspace_json(w) for w in self.workspaces.values()]
        return self._page(items, body)

    def _search(self, request, body, args) -> Response:
        if "cursor" in body and set(body) - {"cursor"}:
            return _error(400, "A cursor request takes no other parameter")
        wanted = {n.casefold() for n in body.get("groupNames") or []}
        groups = [{"id": self.group_id_of(scim_id), "name": name, "type": "group"}
                  for scim_id, name in self._group_names_by_scim_id().items()
                  if "cursor" in body or not wanted or name.casefold() in wanted]
        return self._page(groups, body)

    def _assignments(self, request, body, args) -> Response:
        scim_id = self._scim_id(args["group"])
        if scim_id is None:
            return _error(404, "Group not found")
        by_workspace: dict[str, list[str]] = {}
        for workspace_id, role in sorted(self._grants.get(scim_id, ())):
            by_workspace.setdefault(workspace_id, []).append(role)
        items = [{"resourceId": w, "roles": roles} for w, roles in by_workspace.items()]
        query = {"limit": int(request.args.get("limit", MAX_LIMIT)), **({"cursor": request.args["cursor"]} if "cursor" in request.args else {})}
        return self._page(items, query)

    def _assign(self, request, body, args) -> Response:
        return self._change(args, body, "assign")

    def _revoke(self, request, body, args) -> Response:
        return self._change(args, body, "revoke")

    def _change(self, args, body, operation: str) -> Response:
        scim_id = self._scim_id(args["group"])
        if scim_id is None:
            return _error(404, "Group not found")
        workspace_id, role = body.get("resourceId"), body.get("roleId")
        if workspace_id not in self.workspaces or not role:
            return _error(400, "resourceId must be a workspace of the organization, and roleId a role")
        held = self._grants.setdefault(scim_id, set())
        (held.add if operation == "assign" else held.discard)((workspace_id, role))
        names = self._group_names_by_scim_id()
        self.events.append((operation, names[scim_id], workspace_id, frozenset(names.values())))
        return Response(status=204)

    # -- helpers ----------------------------------------------------------------------------------------
    def _group_names_by_scim_id(self) -> dict[str, str]:
        storage = self.scim.storage
        with storage.lock:
            return {scim_id: group.display_name for scim_id, group in storage._resources.get("Group", {}).items()}

    def _scim_id(self, org_group_id: str) -> str | None:
        return next((s for s in self._group_names_by_scim_id() if self.group_id_of(s) == org_group_id), None)

    def _drop_deleted_groups(self) -> None:
        """A group deleted over SCIM takes its grants with it."""
        alive = self._group_names_by_scim_id()
        for scim_id in [s for s in self._grants if s not in alive]:
            del self._grants[scim_id]

    def _workspace_json(self, workspace: SandboxWorkspace) -> dict:
        attributes = {"name": workspace.host.split(".")[0], "typeKey": workspace.type_key, "type": workspace.type_key,
                      "hostUrl": f"https://{workspace.host}", "status": "online"}
        if workspace.capacity is not None:
            attributes.update(capacity=workspace.capacity, usage=self._usage(workspace.id) + workspace.hand_users)
        return {"id": workspace.id, "type": "workspaces", "attributes": attributes, "links": {}}

    def _usage(self, workspace_id: str) -> int:
        storage = self.scim.storage
        users: set[str] = set()
        with storage.lock:
            groups = storage._resources.get("Group", {})
            for scim_id, held in self._grants.items():
                if any(w == workspace_id for w, _ in held) and scim_id in groups:
                    users.update(m.value for m in groups[scim_id].members or [])
        return len(users)

    def _page(self, items: list, body: dict) -> Response:
        """One page; the rest waits under an opaque cursor (which carries the query, as Atlassian's do)."""
        if body.get("cursor"):
            if body["cursor"] not in self._cursors:
                return _error(400, "Invalid page cursor")
            items, limit = self._cursors.pop(body["cursor"])
        else:
            limit = max(1, min(int(body.get("limit") or MAX_LIMIT), MAX_LIMIT))
        links = {}
        if len(items) > limit:
            token = uuid.uuid4().hex
            self._cursors[token] = (items[limit:], limit)
            links["next"] = token
        return _json({"data": items[:limit], "links": links})

    def _label(self, workspace_id: str) -> str:
        workspace = self.workspaces[workspace_id]
        return f"{workspace.type_key}@{workspace.host}"


def _json(document: dict, status: int = 200) -> Response:
    return Response(json.dumps(document), status=status, content_type="application/json")


def _error(status: int, title: str) -> Response:
    return _json({"errors": [{"status": str(status), "title": title}]}, status)
