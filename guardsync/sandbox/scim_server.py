"""A local SCIM 2.0 server that behaves like Atlassian's user-provisioning API.

The protocol is served by the real scim2-server package (InMemoryStorage, ScimService,
WSGIApplication); this module only adds what Atlassian does differently, at the
extension points scim2-server offers:

- AtlassianStorage: the rules on stored state (verified email domain, primary email,
  group names unique and never renamed), cheap paging of a plain listing, and
  creates and member changes without scim2-server's whole-resource copies;
- AtlassianService: the search restrictions (three eq filters, pages of 100);
- AtlassianHandler: member PATCHes applied as a set update in O(changes)
  (scim2-models' generic PATCH is O(members x operations), far too slow for
  10k-member groups);
- AtlassianApplication: the bearer API key and URLs without the /v2 prefix;
- AtlassianScimServer: mounts it at /scim/directory/{directory_id} over HTTPS.

Searches that compare userName, externalId or displayName with eq hit
InMemoryStorage's equality index (built on the first such search, then kept up to
date on every write), so a lookup does not walk the directory.
"""

from __future__ import annotations

import functools
import itertools
from http import HTTPStatus
from typing import Any, Callable, Iterable
from wsgiref.util import application_uri

from pydantic import TypeAdapter
from scim2_models import (
    Context,
    InvalidFilterException,
    InvalidValueException,
    Meta,
    MutabilityException,
    NotFoundException,
    Resource,
    ResourceType,
    Schema,
    ScimProvider,
    SearchRequest,
)
from scim2_models.path import CompareOperator, Comparison
from scim2_models.path.expressions import AttrPath, ValuePath
from scim2_server.memory import InMemoryStorage
from scim2_server.responses import ScimResponse
from scim2_server.handler import ScimHandler
from scim2_server.service import ScimService
from scim2_server.storage import SearchPage
from scim2_server.testserver.application import BEARER_TOKEN_SCHEME, BearerTokenApplication
from scim2_server.utils import load_default_resource_types, load_default_service_provider_config, load_json_resource
from werkzeug.wrappers import Request

from guardsync.sandbox.http import SandboxCA, SandboxServer
from guardsync.scim import endpoint_key

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PAGE_LIMIT = 100

# Atlassian filters on these attributes only (resource type -> attribute names).
FILTERABLE = {"User": {"userName", "externalId"}, "Group": {"displayName"}}


# -- description of the service ---------------------------------------------


def atlassian_provider() -> ScimProvider:
    """The RFC 7643 schemas, with group names unique, and Atlassian's capabilities."""
    schemas = [Schema.model_validate(_with_unique_group_names(s)) for s in load_json_resource("default-schemas.json")]
    config = load_default_service_provider_config()
    config.bulk.supported = False  # Atlassian has no /Bulk
    config.sort.supported = False
    config.etag.supported = False
    config.change_password.supported = False
    config.filter.max_results = PAGE_LIMIT  # scim2-server then serves count > 100 as 100
    config.authentication_schemes = [BEARER_TOKEN_SCHEME]
    return ScimProvider.from_discovery(schemas, load_default_resource_types().values(), config=config)


def _with_unique_group_names(schema: dict) -> dict:
    # RFC 7643 leaves Group.displayName non-unique; Atlassian answers 409 on a taken name.
    if schema["id"] == CORE_GROUP:
        for attribute in schema["attributes"]:
            if attribute["name"] == "displayName":
                attribute["uniqueness"] = "server"
    return schema


# -- storage: the rules on stored state ----------------------------------------


class AtlassianStorage(InMemoryStorage):
    """InMemoryStorage plus Atlassian's rules on users and groups, and O(page) listing."""

    def __init__(self, verified_domains: Iterable[str]):
        super().__init__()
        self.verified_domains = {d.casefold() for d in verified_domains}
        # Resource type -> ids in creation order (a dict keeps order and deletes in O(1)).
        # Updates keep their place, so paging stays stable while a sync writes.
        self._listing: dict[str | None, dict[str, None]] = {}
        self._member_maps: dict[str, dict[str, Any]] = {}  # group id -> its members by value (see apply_member_changes)

    def create(self, resource_type: ResourceType, resource: Resource[Any]) -> Resource[Any]:
        # As InMemoryStorage.create, less its two deep copies (a third of the server's CPU for a
        # POST): the resource was validated for this request alone, and the handler answers
        # with a published copy of what this returns.
        with self.lock:
            self._check_rules(resource_type, resource, stored=None)
            resource.id = self.generate_id(resource_type, resource)
            now = self.clock()
            resource.meta = Meta(resource_type=resource_type.name, created=now, last_modified=now,
                                 version=self.next_version())
            values = self._values_of(resource)
            self._check_uniqueness(resource, values)
            self._store(resource, values)
            self._listing.setdefault(resource_type.name, {})[resource.id] = None
            return resource

    def update(self, resource_type, resource, *, expected_version=None):
        with self.lock:
            stored = self._stored(resource_type, resource.id)
            self._check_rules(resource_type, resource, stored=stored)
            self._member_maps.pop(resource.id, None)
            return super().update(resource_type, resource, expected_version=expected_version)

    def apply_member_changes(self, resource_type: ResourceType, group_id: str, changes: list[tuple[str, Any]],
                             check: Callable[[Resource[Any]], None]) -> Resource[Any]:
        """Add (validated member models) and remove (values) members of a stored group, in
        O(changes): the base class's update re-validates and re-dumps the whole group, ~50 ms
        a PATCH on a 20,000-member group, which made the sandbox the bottleneck of big loads.
        `check` sees the stored group first (preconditions). Returns the stored group."""
        with self.lock:
            stored = self._stored(resource_type, group_id)
            check(stored)
            members = self._member_maps.get(group_id)
            if members is None:  # built once per group, then kept up to date here
                members = self._member_maps[group_id] = {member.value: member for member in stored.members or []}
            changed = False
            for op, payload in changes:
                if op == "remove":
                    changed |= members.pop(payload, None) is not None
                    continue
                for member in payload:
                    if member.value not in members:
                        members[member.value] = member
                        changed = True
            if changed:
                # Neither unique nor indexed values change; validate_assignment would walk every member.
                stored.__dict__["members"] = list(members.values()) or None
                stored.meta = stored.meta.model_copy(update={"last_modified": self.clock(), "version": self.next_version()})
            return stored

    def delete(self, resource_type, resource_id, *, expected_version=None):
        with self.lock:
            super().delete(resource_type, resource_id, expected_version=expected_version)
            self._listing.get(resource_type.name, {}).pop(resource_id, None)
            self._member_maps.pop(resource_id, None)
            if resource_type.name == "User":
                # As Atlassian does: a deleted user leaves every group (no member pointing at nothing).
                for group in self._resources.get("Group", {}).values():
                    if group.members and any(member.value == resource_id for member in group.members):
                        group.members = [member for member in group.members if member.value != resource_id] or None
                        self._member_maps.pop(group.id, None)

    def search(self, resource_types, search_request: SearchRequest[Any], *, position=None) -> SearchPage:
        if not _is_plain_listing(resource_types, search_request):
            return super().search(resource_types, search_request, position=position)
        # The base class sorts every resource on every page (O(n log n) a page);
        # a plain listing pages the creation order instead.
        with self.lock:
            name = resource_types[0].name
            ids = self._listing.get(name, {})
            start = search_request.start_index_0 or 0
            stop = start + (search_request.count if search_request.count is not None else len(ids))
            stored = self._resources.get(name, {})
            page = [stored[i].model_copy(deep=True) for i in itertools.islice(ids, start, stop)]
            return SearchPage(len(ids), page)

    def get(self, resource_type, resource_id, *, response_parameters=None):
        if resource_type.name != "Group":
            return super().get(resource_type, resource_id, response_parameters=response_parameters)
        with self.lock:
            return _copy_group(self._stored(resource_type, resource_id))

    def stored_of(self, resource_type_name: str) -> list[Resource[Any]]:
        with self.lock:
            return [r.model_copy(deep=True) for r in self._resources.get(resource_type_name, {}).values()]

    # -- rules ---------------------------------------------------------------
    def _check_rules(self, resource_type: ResourceType, resource: Resource[Any], stored) -> None:
        if resource_type.name == "User":
            self._check_user(resource)
        elif resource_type.name == "Group" and stored is not None:
            if stored.display_name != resource.display_name:
                raise MutabilityException(
                    detail="Renaming a group is not supported: create a group with the new name, "
                    "move the members and delete the old group"
                )

    def _check_user(self, user: Resource[Any]) -> None:
        if not user.user_name:
            raise InvalidValueException(detail="userName is required")
        primary = [e for e in (user.emails or []) if e.primary and e.value]
        if not primary:
            raise InvalidValueException(detail="A primary email is required")
        domain = str(primary[0].value).rpartition("@")[2].casefold()
        if domain not in self.verified_domains:
            raise InvalidValueException(
                detail=f"The email domain {domain!r} is not verified in this organization; "
                "verify it in Atlassian Administration before provisioning its users"
            )


def _copy_group(group: Resource[Any]) -> Resource[Any]:
    """A copy as good as a deep one, and O(members) of list work only: member models are
    shared, since nothing edits one in place (a PATCH builds a new member list)."""
    members = group.members
    copied = group.model_copy(update={"members": None}).model_copy(deep=True)
    if members is not None:
        copied.__dict__["members"] = list(members)
    return copied


def _is_plain_listing(resource_types, search_request: SearchRequest[Any]) -> bool:
    return (
        len(resource_types) == 1
        and search_request.filter is None
        and search_request.sort_by is None
        and search_request.cursor is None
    )


# -- service: what a search may ask ---------------------------------------------


class AtlassianService(ScimService):
    """Only `userName eq`/`externalId eq` on Users and `displayName eq` on Groups."""

    def patch_response(self, base_url: str, resource: Resource[Any], response_parameters):
        if response_parameters.attributes or response_parameters.excluded_attributes:
            return super().patch_response(base_url, resource, response_parameters)
        # The base class answers the same 204 but first publishes (deep-copies) the
        # resource for nothing: seconds per request on a 10k-member group.
        return ScimResponse(HTTPStatus.NO_CONTENT, None, {})

    def read_search(self, resource_types: list[ResourceType], payload: Any):
        search_request, position = super().read_search(resource_types, payload)
        if len(resource_types) != 1:
            raise InvalidFilterException(detail="Search the /Users or /Groups endpoint")
        if search_request.filter is not None:
            _check_filter(resource_types[0].name, search_request)
        return search_request, position


def _member_changes(resource_type: ResourceType, patch_op) -> list[tuple[str, Any]] | None:
    """[("add", [member models]) | ("remove", "id"), ...] if every operation is a plain
    member add or remove on a group, else None (scim2-models then applies the PATCH)."""
    if resource_type.name != "Group":
        return None
    changes = []
    for operation in patch_op.operations or []:
        op = getattr(operation.op, "value", operation.op)
        ast = operation.path.ast if operation.path is not None else None
        if op == "add" and isinstance(ast, AttrPath) and _is_members(ast) and isinstance(operation.value, list):
            changes.append(("add", operation.value))
        elif op == "remove" and isinstance(ast, ValuePath) and _is_member_value_eq(ast):
            changes.append(("remove", ast.val_filter.value))
        else:
            return None
    return changes


def _is_members(attr_path: AttrPath) -> bool:
    return attr_path.attr == "members" and attr_path.sub_attr is None and attr_path.uri in (None, CORE_GROUP)


def _is_member_value_eq(value_path: ValuePath) -> bool:
    condition = value_path.val_filter
    return (
        _is_members(value_path.attr_path)
        and value_path.sub_attr is None
        and isinstance(condition, Comparison)
        and condition.op == CompareOperator.eq
        and condition.attr_path.attr == "value"
        and condition.attr_path.sub_attr is None
        and isinstance(condition.value, str)
    )


@functools.cache
def _members_adapter(group_model: type) -> TypeAdapter:
    """The validator of a group's member list (building one costs milliseconds: once per model)."""
    return TypeAdapter(group_model.model_fields["members"].annotation)


def _check_filter(resource_type_name: str, search_request: SearchRequest[Any]) -> None:
    scim_filter = search_request.filter
    node = scim_filter.ast
    allowed = FILTERABLE.get(resource_type_name, set())
    if isinstance(node, Comparison) and node.op == CompareOperator.eq and isinstance(node.value, str):
        binding = scim_filter.resolve_comparison(node.attr_path, strict=False)
        if binding is not None and binding.urn.rpartition(":")[2] in allowed:
            return
    raise InvalidFilterException(
        detail=f"Unsupported filter {str(scim_filter)!r}: only "
        + " or ".join(f'{name} eq "..."' for name in sorted(allowed))
        + f" is supported on {resource_type_name}s"
    )


# -- application: the key and the URLs --------------------------------------------


class AtlassianHandler(ScimHandler):
    """Member PATCHes of a group go to the storage's member map, as a set update in O(changes).

    scim2-models would snapshot the whole group and scan every member for each operation
    (O(members x operations): minutes for a 10k group), then re-validate the group to store it.
    """

    def patch_resource(self, resource_type, resource_id, patch_op, conditions):
        changes = _member_changes(resource_type, patch_op)
        if changes is None:
            return super().patch_resource(resource_type, resource_id, patch_op, conditions)
        adapter = _members_adapter(self.service.get_model(resource_type))
        validated = [(op, (adapter.validate_python(payload) or []) if op == "add" else payload) for op, payload in changes]
        return self.storage.apply_member_changes(
            resource_type, resource_id, validated,
            check=lambda stored: self.service.check_preconditions(stored, "PATCH", conditions))


class AtlassianApplication(BearerTokenApplication):
    def __init__(self, storage, *args, **kwargs):
        super().__init__(storage, *args, **kwargs)
        self.handler = AtlassianHandler(self.service, storage)

    @staticmethod
    def get_base_url(environ) -> str:
        # Atlassian's URLs have no /v2 segment: {scim_url}/Users/{id}.
        return application_uri(environ).rstrip("/")


class _Mount:
    """Serve `app` under `prefix` (moved to SCRIPT_NAME); 404 elsewhere."""

    def __init__(self, prefix: str, app):
        self.prefix = prefix
        self.app = app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            body = b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"404","detail":"Not found"}'
            start_response("404 Not Found", [("Content-Type", "application/scim+json")])
            return [body]
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.prefix
        environ["PATH_INFO"] = path[len(self.prefix) :]
        return self.app(environ, start_response)


# -- the server --------------------------------------------------------------------


class AtlassianScimServer(SandboxServer):
    """An Atlassian-flavoured SCIM directory over HTTPS on loopback."""

    def __init__(
        self,
        ca: SandboxCA,
        api_key: str,
        verified_domains: set[str],
        directory_id: str = "sandbox-directory",
        latency: float = 0.0,
    ):
        self.directory_id = directory_id
        self.prefix = f"/scim/directory/{directory_id}"
        provider = atlassian_provider()
        self.service = AtlassianService(provider)
        self.storage = AtlassianStorage(verified_domains)
        self.application = AtlassianApplication(self.storage, provider, self.service, bearer_tokens=[api_key])
        super().__init__(_Mount(self.prefix, self.application), ca, latency=latency)
        self._index_filterable_attributes()

    def _index_filterable_attributes(self) -> None:
        # InMemoryStorage builds an equality index on the first search by an attribute,
        # then keeps it current on every write. Searching the empty store now makes that
        # first build free, instead of an O(n) stall at the first lookup of a big directory.
        with self.service.provider:
            for resource_type_name, attributes in FILTERABLE.items():
                resource_type = self.service.get_resource_type(resource_type_name)
                for attribute in attributes:
                    request, _ = self.service.read_search([resource_type], {"filter": f'{attribute} eq ""'})
                    self.storage.search([resource_type], request)

    @property
    def scim_url(self) -> str:
        return f"{self.base_url}{self.prefix}"

    def endpoint_of(self, request: Request) -> str:
        path = request.path
        if path.startswith(self.prefix):
            return endpoint_key(request.method, path[len(self.prefix) :])
        return f"{request.method} {path}"

    # -- inspection and seeding, for tests and the demo ------------------------
    def users(self) -> list[dict]:
        """SCIM JSON of every stored user (O(n): for tests and the demo, not per request)."""
        return [self._dump(r) for r in self.storage.stored_of("User")]

    def groups(self) -> list[dict]:
        """SCIM JSON of every stored group, with its members' values."""
        return [self._dump(r) for r in self.storage.stored_of("Group")]

    def add_user(self, user: dict) -> dict:
        """Store a user as if someone else had provisioned it (adoption tests); returns it with its id."""
        return self._add("User", {"schemas": [CORE_USER], **user})

    def add_group(self, name: str, member_ids: Iterable[str] = ()) -> dict:
        """Store a group guardsync did not create, with these user ids as members."""
        members = [{"value": member_id} for member_id in member_ids]
        return self._add("Group", {"schemas": [CORE_GROUP], "displayName": name, "members": members})

    def provision(self, users: Iterable[dict], groups: dict[str, Iterable[str]] | None = None) -> dict[str, str]:
        """Fill the directory as another provisioner left it (Atlassian's own Entra sync, Entra's gallery
        app, invitations by hand): users as SCIM JSON, groups by name with their members' userNames.
        Returns userName -> SCIM id. Written to the store directly: no request is counted."""
        ids = {user["userName"]: self.add_user(user)["id"] for user in users}
        for name, member_names in (groups or {}).items():
            self.add_group(name, [ids[member] for member in member_names])
        return ids

    def _add(self, resource_type_name: str, payload: dict) -> dict:
        resource_type = self.service.get_resource_type(resource_type_name)
        model = self.service.get_model(resource_type)
        with self.service.provider:
            resource = model.model_validate(payload, scim_ctx=Context.RESOURCE_CREATION_REQUEST)
            return self._dump(self.storage.create(resource_type, resource))

    def _dump(self, resource: Resource[Any]) -> dict:
        with self.service.provider:
            return resource.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)

    # -- hand edits: an admin's changes in Atlassian administration, written to the store (not counted) --
    def delete_by_hand(self, resource_type_name: str, scim_id: str) -> None:
        """Delete a user ("User") or group ("Group"); a deleted user leaves its groups, as over the API."""
        self.storage.delete(self.service.get_resource_type(resource_type_name), scim_id)

    def edit_user_by_hand(self, scim_id: str, **attributes) -> dict:
        """Replace top-level attributes of a stored user (`emails=[...]`, `active=False`, ...); Atlassian's
        rules still hold (a primary email on a verified domain)."""
        resource_type = self.service.get_resource_type("User")
        model = self.service.get_model(resource_type)
        current = self.get_user(scim_id)
        payload = {key: value for key, value in current.items() if key != "meta"} | attributes
        with self.service.provider:
            resource = model.model_validate(payload, scim_ctx=Context.RESOURCE_REPLACEMENT_REQUEST)
            resource.id = scim_id
            return self._dump(self.storage.update(resource_type, resource))

    def get_user(self, scim_id: str) -> dict:
        return self._get("User", scim_id)

    def get_group(self, scim_id: str) -> dict:
        return self._get("Group", scim_id)

    def _get(self, resource_type_name: str, scim_id: str) -> dict:
        resource_type = self.service.get_resource_type(resource_type_name)
        try:
            return self._dump(self.storage.get(resource_type, scim_id))
        except NotFoundException:
            raise KeyError(scim_id) from None

