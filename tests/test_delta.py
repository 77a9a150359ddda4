"""Graph delta queries over real HTTPS on loopback, and the pure merge of what they return.

GraphClient.read_changes talks TLS to the Graph emulator, whose delta endpoints read the
Tenant's change log; apply_changes merges the result into the previous Snapshot. The
yardstick throughout is a full extract() of the same tenant: a delta read and merged
must give exactly the frames extract() gives (modulo row order).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardsync.delta import apply_changes
from guardsync.errors import ApiError
from guardsync.graph import DeltaLinkExpired, DeltaLinks, GraphChanges, GraphClient, _changes
from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, Snapshot
from guardsync.sandbox.graph_emulator import GraphEmulator
from guardsync.sandbox.http import Fault, SandboxCA
from guardsync.sandbox.tenant import generate_tenant

USERS_DELTA = "GET /v1.0/users/delta"
GROUPS_DELTA = "GET /v1.0/groups/delta"
TOKEN = "POST /{tenant}/oauth2/v2.0/token"
DISCOVERY = "GET /{tenant}/v2.0/.well-known/openid-configuration"
OBJECTS_PER_PAGE, LINKS_PER_PAGE = 50, 100  # lowered caps, so a small tenant pages like a big one


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return SandboxCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def tenant():
    return generate_tenant(users=400, groups=12, memberships=1200, seed=5)


@pytest.fixture
def emulator(tenant, ca, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_file))
    server = GraphEmulator(tenant, ca).start()
    server.delta_page_objects, server.delta_page_links = OBJECTS_PER_PAGE, LINKS_PER_PAGE
    yield server
    server.stop()


@pytest.fixture
def make_client(emulator, tenant):
    clients = []

    def make() -> GraphClient:
        clients.append(
            GraphClient(
                tenant_id=tenant.initial_domain,
                client_id=tenant.client_id,
                client_secret=tenant.client_secret,
                authority_host=emulator.authority_host,
                graph_url=emulator.graph_url,
                max_retry_seconds=20.0,
            )
        )
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


# -- helpers -------------------------------------------------------------------------------


def rows(frame: pd.DataFrame) -> Counter:
    """A frame's rows as a multiset, NaN read as None: row order and NaN-vs-None do not count."""
    return Counter(tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row)
                   for row in frame.itertuples(index=False, name=None))


def assert_same_tenant(merged: Snapshot, extracted: Snapshot) -> None:
    assert list(merged.users.columns) == USER_COLUMNS
    assert list(merged.groups.columns) == GROUP_COLUMNS
    assert list(merged.edges.columns) == EDGE_COLUMNS
    assert merged.users["accountEnabled"].dtype == bool
    assert rows(merged.users) == rows(extracted.users)
    assert rows(merged.groups) == rows(extracted.groups)
    assert rows(merged.edges) == rows(extracted.edges)
    assert (merged.tenant_id, merged.organization, merged.initial_domain) == (
        extracted.tenant_id, extracted.organization, extracted.initial_domain)
    assert sorted(merged.verified_domains) == sorted(extracted.verified_domains)


def first_read(client: GraphClient) -> tuple[Snapshot, GraphChanges]:
    changes = client.read_changes(None)
    assert changes.full
    return apply_changes(None, changes), changes


def group_named(tenant, name: str) -> str:
    return next(g["id"] for g in tenant.groups.values() if g["displayName"] == name)


def user_in_groups(tenant) -> str:
    """A member user that belongs to at least two groups."""
    counts = Counter(m for members in tenant.members.values() for m in members if m in tenant.users)
    return next(user_id for user_id, n in counts.most_common() if n >= 2)


def changes_of(**fields) -> GraphChanges:
    base = dict(full=False, users=[], removed_users=[], groups=[], removed_groups=[], added_edges=[], removed_edges=[],
                links=DeltaLinks("u", "g"), verified_domains=["contoso.com"], initial_domain="contoso.onmicrosoft.com",
                tenant_id="t-1", organization="Contoso Ltd")
    base.update(fields)
    return GraphChanges(**base)


def snapshot_of(users=(), groups=(), edges=()) -> Snapshot:
    return apply_changes(None, changes_of(full=True, users=list(users), groups=list(groups), added_edges=list(edges)))


# -- the initial round -------------------------------------------------------------------------


def test_initial_round_equals_extract(client, emulator, tenant):
    changes = client.read_changes(None)

    assert changes.full and not changes.is_empty
    assert len(changes.users) == len(tenant.users) == 400
    assert changes.removed_users == changes.removed_groups == changes.removed_edges == []
    assert changes.links.users.startswith(emulator.graph_url + "/v1.0/users/delta?$deltatoken=")
    assert changes.links.groups.startswith(emulator.graph_url + "/v1.0/groups/delta?$deltatoken=")
    assert_same_tenant(apply_changes(None, changes), client.extract())
    assert {t for _, _, t in changes.added_edges} == {"user", "group", "device", "servicePrincipal", "orgContact"}
    # Users: a delta link "from now", then the plain listing at 999 a page (delta pages are smaller);
    # groups: the delta round, split by their member entries at 100 a page.
    assert emulator.requests[USERS_DELTA] == 1
    assert emulator.requests["GET /v1.0/users"] == 2 * math.ceil(400 / 999)  # this read, and extract() above
    links = sum(len(m) for m in tenant.members.values())
    assert emulator.requests[GROUPS_DELTA] >= math.ceil(links / LINKS_PER_PAGE) > len(tenant.groups)


def test_a_big_group_is_spread_over_several_pages_and_merged(client, emulator, tenant):
    biggest = max(tenant.members, key=lambda g: len(tenant.members[g]))
    assert len(tenant.members[biggest]) > 2 * LINKS_PER_PAGE  # the fixture really splits a group

    appearances, page = [], client.get("/groups/delta", {"$select": "displayName,members"})
    while True:
        assert len(page["value"]) <= OBJECTS_PER_PAGE
        assert sum(len(g.get("members@delta", [])) for g in page["value"]) <= LINKS_PER_PAGE
        appearances += [g for g in page["value"] if g["id"] == biggest]
        if "@odata.deltaLink" in page:
            break
        page = client.get(page["@odata.nextLink"])

    assert len(appearances) >= 3  # one group, several pages, each with part of its members
    assert all(part["displayName"] == tenant.groups[biggest]["displayName"] for part in appearances)
    parts = [[m["id"] for m in part["members@delta"]] for part in appearances]
    assert [m for part in parts for m in part] == tenant.members[biggest]  # disjoint parts, all of them

    changes = client.read_changes(None)
    assert sorted(m for g, m, _ in changes.added_edges if g == biggest) == sorted(tenant.members[biggest])
    assert [g["id"] for g in changes.groups].count(biggest) == 1


# -- a run with no change ------------------------------------------------------------------------


def test_no_change_costs_four_graph_requests_and_changes_nothing(make_client, emulator):
    previous, first = first_read(make_client())
    emulator.reset_counts()
    client = make_client()  # a new run: a new client, a new token

    changes = client.read_changes(first.links)

    assert changes.is_empty and not changes.full
    assert dict(emulator.requests) == {
        DISCOVERY: 1, TOKEN: 1,  # msal's OpenID discovery and the app token
        "GET /v1.0/organization": 1, "GET /v1.0/domains": 1, USERS_DELTA: 1, GROUPS_DELTA: 1,
    }
    assert client.requests_made == emulator.requests
    assert_same_tenant(apply_changes(previous, changes), previous)
    # Graph hands out new links every round; nothing happened, so they point where the old ones did.
    again = make_client().read_changes(changes.links)
    assert again.is_empty and again.links != changes.links


# -- users -----------------------------------------------------------------------------------------


def test_user_added_updated_disabled_and_deleted(client, emulator, tenant):
    previous, first = first_read(client)
    ids = sorted(tenant.users)
    renamed, untitled, disabled, deleted = ids[10], ids[11], ids[12], user_in_groups(tenant)
    new = tenant.add_user(userPrincipalName="new.joiner@contoso.com", givenName="New", surname="Joiner")
    tenant.update_user(renamed, displayName="Renamed Person", userPrincipalName="renamed@contoso.com")
    tenant.update_user(untitled, jobTitle=None)
    tenant.update_user(disabled, accountEnabled=False)
    tenant.delete_user(deleted)
    emulator.reset_counts()

    changes = client.read_changes(first.links)

    assert not changes.full
    assert emulator.requests[USERS_DELTA] == emulator.requests[GROUPS_DELTA] == 1
    assert changes.removed_users == [deleted]
    by_id = {u["id"]: u for u in changes.users}
    assert set(by_id) == {new, renamed, untitled, disabled}
    assert by_id[new] == {"id": new, "userPrincipalName": "new.joiner@contoso.com", "displayName": "new.joiner",
                          "givenName": "New", "accountEnabled": True, "userType": "Member",
                          "surname": "Joiner"}  # properties never set (mail, jobTitle) are left out, as Graph does
    assert by_id[untitled]["jobTitle"] is None  # written as null since the last round: there, as null
    assert by_id[disabled]["accountEnabled"] is False
    assert changes.added_edges == changes.removed_edges == []  # a deletion is the user's change, not the groups'

    merged = apply_changes(previous, changes)
    assert_same_tenant(merged, client.extract())
    users = merged.users.set_index("id")
    assert users.loc[renamed, "userPrincipalName"] == "renamed@contoso.com"
    assert pd.isna(users.loc[untitled, "jobTitle"]) and not users.loc[disabled, "accountEnabled"]
    assert pd.isna(users.loc[new, "mail"]) and users.loc[new, "accountEnabled"]
    assert deleted not in set(merged.edges["member_id"]) and deleted in set(previous.edges["member_id"])


# -- groups and memberships ------------------------------------------------------------------------------


def test_members_added_and_removed_including_a_nested_group_and_a_device(client, emulator, tenant):
    previous, first = first_read(client)
    target, nested = group_named(tenant, "Pilot Champions"), group_named(tenant, "Pilot")
    device = tenant.add_other("device")
    joiner = sorted(u for u in tenant.users if u not in tenant.members[target])[0]
    leaver = next(m for m in tenant.members[target] if m in tenant.users)
    tenant.add_member(target, joiner)
    tenant.add_member(target, nested)
    tenant.add_member(target, device)
    tenant.remove_member(target, leaver)

    changes = client.read_changes(first.links)

    assert [g["id"] for g in changes.groups] == [target]
    assert sorted(changes.added_edges) == sorted([(target, joiner, "user"), (target, nested, "group"), (target, device, "device")])
    assert changes.removed_edges == [(target, leaver)]
    assert changes.users == changes.removed_users == []
    assert_same_tenant(apply_changes(previous, changes), client.extract())


def test_group_renamed_and_group_deleted(client, emulator, tenant):
    previous, first = first_read(client)
    renamed = group_named(tenant, "Pilot")
    # A group that has members and is itself nested in another group: deleting it ends both kinds of edge.
    doomed = next(g for g in tenant.groups if tenant.members[g] and any(g in m for p, m in tenant.members.items() if p != g))
    new = tenant.add_group("Brand New")
    tenant.add_member(new, sorted(tenant.users)[0])
    tenant.rename_group(renamed, "Pilot Wave 2")
    tenant.delete_group(doomed)

    changes = client.read_changes(first.links)

    assert changes.removed_groups == [doomed]
    assert {g["id"]: g.get("displayName") for g in changes.groups} == {new: "Brand New", renamed: "Pilot Wave 2"}
    merged = apply_changes(previous, changes)
    assert_same_tenant(merged, client.extract())
    assert doomed not in set(merged.edges["group_id"]) | set(merged.edges["member_id"])
    assert doomed in set(previous.edges["group_id"]) and doomed in set(previous.edges["member_id"])


def test_many_new_members_of_one_group_arrive_over_several_pages(client, emulator, tenant):
    previous, first = first_read(client)
    group = tenant.add_group("Everyone")
    for user_id in sorted(tenant.users)[:260]:
        tenant.add_member(group, user_id)
    emulator.reset_counts()

    changes = client.read_changes(first.links)

    assert emulator.requests[GROUPS_DELTA] == 3  # 260 member entries at 100 a page
    assert changes.groups == [{"id": group, "displayName": "Everyone"}]
    assert len(changes.added_edges) == 260
    assert_same_tenant(apply_changes(previous, changes), client.extract())


# -- replays and resyncs -------------------------------------------------------------------------------------


def test_replaying_the_same_delta_link_gives_the_same_snapshot(client, emulator, tenant):
    previous, first = first_read(client)
    pilot, ids = group_named(tenant, "Pilot"), sorted(tenant.users)
    tenant.update_user(ids[3], jobTitle="Replayed")
    tenant.add_member(pilot, ids[4]) if ids[4] not in tenant.members[pilot] else tenant.remove_member(pilot, ids[4])
    tenant.delete_user(ids[5])

    once = client.read_changes(first.links)
    twice = client.read_changes(first.links)  # the run crashed before storing the links: same round again

    assert (once.users, once.removed_users, once.added_edges, once.removed_edges) == (
        twice.users, twice.removed_users, twice.added_edges, twice.removed_edges)
    merged = apply_changes(previous, once)
    assert_same_tenant(apply_changes(previous, twice), merged)
    assert_same_tenant(apply_changes(merged, twice), merged)  # applied on top of itself: no change
    assert_same_tenant(merged, client.extract())


def test_replayed_items_within_a_round_are_harmless(client, emulator, tenant):
    previous, first = first_read(client)
    user_id, group_id = sorted(tenant.users)[0], group_named(tenant, "Pilot")
    member = tenant.members[group_id][0]
    page = {
        "value": [
            {"id": user_id, "jobTitle": "Old news"},
            {"id": user_id, "jobTitle": "Old news"},  # a replay
            {"id": user_id, "displayName": "Later"},  # a later change with other properties
        ],
        "@odata.deltaLink": first.links.users,
    }
    emulator.inject(Fault("GET", r"^/v1\.0/users/delta\?", status=200, body=json.dumps(page)))
    groups_page = {
        "value": [
            {"id": group_id, "displayName": "Pilot", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": member, "@removed": {"reason": "deleted"}}]},
            {"id": group_id, "displayName": "Pilot", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": member, "@removed": {"reason": "deleted"}}]},
        ],
        "@odata.deltaLink": first.links.groups,
    }
    emulator.inject(Fault("GET", r"^/v1\.0/groups/delta\?", status=200, body=json.dumps(groups_page)))

    changes = client.read_changes(first.links)

    assert changes.users == [{"id": user_id, "jobTitle": "Old news", "displayName": "Later"}]
    assert changes.removed_edges == [(group_id, member)]
    merged = apply_changes(previous, changes).users.set_index("id").loc[user_id]
    before = previous.users.set_index("id").loc[user_id]
    assert (merged["jobTitle"], merged["displayName"], merged["userPrincipalName"]) == (
        "Old news", "Later", before["userPrincipalName"])


@pytest.mark.parametrize("status, code", [(410, "syncStateNotFound"), (400, "syncStateNotFound"), (410, "resyncRequired")])
def test_expired_delta_link_resyncs_everything(client, emulator, tenant, caplog, status, code):
    stale, first = first_read(client)
    ids = sorted(tenant.users)
    tenant.update_user(ids[0], displayName="Changed While Expired")
    tenant.delete_user(ids[1])
    tenant.rename_group(group_named(tenant, "Pilot"), "Pilot Renamed")
    emulator.expire_delta_links(status=status, code=code)
    emulator.reset_counts()
    caplog.set_level(logging.WARNING, logger="guardsync.graph")

    changes = client.read_changes(first.links)

    assert changes.full
    assert f"Graph delta link expired ({code})" in caplog.text and "full resync" in caplog.text
    assert emulator.requests[USERS_DELTA] == 2  # expired, then a link "from now" for the full read
    merged = apply_changes(stale, changes)  # the stale snapshot is ignored: a complete picture
    assert_same_tenant(merged, client.extract())
    assert client.read_changes(changes.links).is_empty  # the new links work


def test_expiry_on_a_next_link_restarts_the_full_read(client, emulator, tenant):
    emulator.inject(Fault("GET", r"^/v1\.0/groups/delta\?\$skiptoken=", status=410,
                          body=json.dumps({"error": {"code": "syncStateNotFound", "message": "expired"}})))

    changes = client.read_changes(None)

    assert changes.full
    assert_same_tenant(apply_changes(None, changes), client.extract())
    assert emulator.requests["GET /v1.0/users"] == 3 * math.ceil(len(tenant.users) / 999)  # read again, and extract()


def test_an_expired_link_that_keeps_expiring_is_an_api_error(client, emulator):
    emulator.inject(Fault("GET", r"^/v1\.0/users/delta", status=410, times=10,
                          body=json.dumps({"error": {"code": "resyncRequired", "message": "reset"}})))

    with pytest.raises(DeltaLinkExpired) as expired:
        client.read_changes(None)

    assert isinstance(expired.value, ApiError) and expired.value.status == 410 and expired.value.code == "resyncRequired"
    assert emulator.requests[USERS_DELTA] == 2  # tried the full read twice, then gave up


def test_throttled_delta_page_is_retried(client, emulator, tenant):
    _, first = first_read(client)
    tenant.update_user(sorted(tenant.users)[0], jobTitle="After throttling")
    emulator.inject(Fault("GET", r"^/v1\.0/users/delta\?\$deltatoken=", status=429, headers={"Retry-After": "0"},
                          body=json.dumps({"error": {"code": "TooManyRequests", "message": "slow down"}})))
    emulator.reset_counts()

    changes = client.read_changes(first.links)

    assert [u["jobTitle"] for u in changes.users] == ["After throttling"]
    assert emulator.requests[USERS_DELTA] == 2


def test_links_for_another_graph_host_read_everything(client, emulator, caplog):
    caplog.set_level(logging.WARNING, logger="guardsync.graph")
    foreign = DeltaLinks("https://graph.example/v1.0/users/delta?$deltatoken=x", "https://graph.example/v1.0/groups/delta?$deltatoken=y")

    changes = client.read_changes(foreign)

    assert changes.full and "not on" in caplog.text
    assert changes.links.users.startswith(emulator.graph_url)


def test_one_missing_link_reads_everything(client):
    _, first = first_read(client)
    assert client.read_changes(DeltaLinks(users=first.links.users, groups=None)).full


# -- the emulator's delta contract -------------------------------------------------------------------------


def test_page_size_is_asked_with_prefer_maxpagesize_and_top_is_ignored(client, emulator, tenant):
    asked = client.get("/users/delta", {"$select": "id"}, headers={"Prefer": "odata.maxpagesize=7"})
    assert len(asked["value"]) == 7 and "@odata.nextLink" in asked
    following = client.get(asked["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=7"})
    assert len(following["value"]) == 7 and {u["id"] for u in following["value"]}.isdisjoint(u["id"] for u in asked["value"])

    top = client.get("/users/delta", {"$select": "id", "$top": 5})  # not supported on delta: ignored, as Graph does
    assert len(top["value"]) == OBJECTS_PER_PAGE

    capped = client.get("/users/delta", {"$select": "id"}, headers={"Prefer": "odata.maxpagesize=999"})
    assert len(capped["value"]) == OBJECTS_PER_PAGE  # Graph caps the preference


def test_sync_from_now_gives_a_link_and_no_data(client, tenant):
    latest = client.get("/users/delta", {"$deltatoken": "latest"})
    assert latest["value"] == [] and "@odata.deltaLink" in latest
    tenant.update_user(sorted(tenant.users)[0], jobTitle="After latest")
    after = client.get(latest["@odata.deltaLink"])
    assert [(u["id"], u["jobTitle"]) for u in after["value"]] == [(sorted(tenant.users)[0], "After latest")]


def test_change_log_reads_only_what_changed_since(tenant):
    start = tenant.sequence
    user_id, group_id = sorted(tenant.users)[0], group_named(tenant, "Pilot")
    tenant.update_user(user_id, jobTitle="A")
    tenant.update_user(user_id, mail=None)
    tenant.add_member(group_id, user_id) if user_id not in tenant.members[group_id] else None
    tenant.remove_member(group_id, user_id)

    users, groups = tenant.changes_since(start)

    assert users == {user_id: {"jobTitle", "mail"}}
    assert groups == {group_id: {user_id: ("user", False)}}  # the last change of a membership wins
    assert tenant.changes_since(tenant.sequence) == ({}, {})
    with pytest.raises(ValueError):
        tenant.changes_since(tenant.sequence + 1)


# -- apply_changes, pure -------------------------------------------------------------------------------------


ALICE = {"id": "u-alice", "userPrincipalName": "alice@contoso.com", "mail": "alice@contoso.com", "displayName": "Alice A",
         "givenName": "Alice", "surname": "A", "jobTitle": "Engineer", "accountEnabled": True, "userType": "Member"}
BOB = {"id": "u-bob", "userPrincipalName": "bob@contoso.com", "mail": None, "displayName": "Bob B", "givenName": "Bob",
       "surname": "B", "jobTitle": None, "accountEnabled": True, "userType": "Member"}
GROUPS = [{"id": "g-eng", "displayName": "Engineering"}, {"id": "g-all", "displayName": "All"}]
EDGES = [("g-eng", "u-alice", "user"), ("g-eng", "u-bob", "user"), ("g-all", "g-eng", "group"), ("g-all", "d-1", "device")]


@pytest.fixture
def small():
    return snapshot_of([ALICE, BOB], GROUPS, EDGES)


def test_partial_user_update_overwrites_only_the_keys_given(small):
    merged = apply_changes(small, changes_of(users=[{"id": "u-alice", "jobTitle": None}, {"id": "u-bob", "accountEnabled": False}]))

    users = merged.users.set_index("id")
    assert pd.isna(users.loc["u-alice", "jobTitle"])  # given as null: cleared
    assert users.loc["u-alice", "displayName"] == "Alice A" and users.loc["u-alice", "accountEnabled"]  # not given: kept
    assert not users.loc["u-bob", "accountEnabled"] and users.loc["u-bob", "userPrincipalName"] == "bob@contoso.com"
    assert merged.users["accountEnabled"].dtype == bool and list(merged.users.columns) == USER_COLUMNS
    assert len(merged.users) == 2 and rows(merged.edges) == rows(small.edges)


def test_new_user_missing_properties_are_none_and_disabled(small):
    merged = apply_changes(small, changes_of(users=[{"id": "u-carol", "userPrincipalName": "carol@contoso.com"}]))

    carol = merged.users.set_index("id").loc["u-carol"]
    assert carol["userPrincipalName"] == "carol@contoso.com"
    assert pd.isna(carol["mail"]) and pd.isna(carol["displayName"])
    assert carol["accountEnabled"] is False or carol["accountEnabled"] == False  # noqa: E712 - numpy bool
    assert merged.users["accountEnabled"].dtype == bool


def test_removed_user_leaves_every_group(small):
    merged = apply_changes(small, changes_of(removed_users=["u-bob"]))

    assert set(merged.users["id"]) == {"u-alice"}
    assert rows(merged.edges) == Counter([("g-eng", "u-alice", "user"), ("g-all", "g-eng", "group"), ("g-all", "d-1", "device")])


def test_removed_group_ends_its_edges_as_group_and_as_member(small):
    merged = apply_changes(small, changes_of(removed_groups=["g-eng"]))

    assert list(merged.groups["id"]) == ["g-all"]
    assert rows(merged.edges) == Counter([("g-all", "d-1", "device")])


def test_edges_are_removed_then_added_never_twice(small):
    merged = apply_changes(small, changes_of(
        added_edges=[("g-eng", "u-alice", "user"), ("g-all", "u-bob", "user"), ("g-all", "u-bob", "user"), ("g-eng", "g-all", "group")],
        removed_edges=[("g-all", "d-1"), ("g-all", "nobody")],
    ))

    assert rows(merged.edges) == Counter([
        ("g-eng", "u-alice", "user"), ("g-eng", "u-bob", "user"), ("g-all", "g-eng", "group"),
        ("g-all", "u-bob", "user"), ("g-eng", "g-all", "group"),
    ])


def test_edges_of_removed_objects_are_not_added(small):
    merged = apply_changes(small, changes_of(removed_users=["u-bob"], added_edges=[("g-all", "u-bob", "user")]))
    assert ("g-all", "u-bob", "user") not in rows(merged.edges)


def test_group_rename_and_new_group(small):
    merged = apply_changes(small, changes_of(groups=[{"id": "g-eng", "displayName": "Engineering EU"}, {"id": "g-new"}]))
    assert rows(merged.groups) == Counter([("g-eng", "Engineering EU"), ("g-all", "All"), ("g-new", None)])


def test_applying_the_same_changes_twice_changes_nothing_more(small):
    changes = changes_of(
        users=[{"id": "u-alice", "displayName": "Alice B"}, {"id": "u-dan", "userPrincipalName": "dan@contoso.com", "accountEnabled": True}],
        removed_users=["u-bob"], groups=[{"id": "g-new", "displayName": "New"}], removed_groups=["g-all"],
        added_edges=[("g-new", "u-dan", "user")], removed_edges=[("g-eng", "u-alice")],
    )
    once = apply_changes(small, changes)
    twice = apply_changes(once, changes)
    for attribute in ("users", "groups", "edges"):
        assert rows(getattr(twice, attribute)) == rows(getattr(once, attribute))
    assert rows(once.edges) == Counter([("g-new", "u-dan", "user")])


def test_full_changes_ignore_the_previous_snapshot(small):
    merged = apply_changes(small, changes_of(full=True, users=[BOB], groups=GROUPS[:1], added_edges=[EDGES[1]]))
    assert list(merged.users["id"]) == ["u-bob"] and list(merged.groups["id"]) == ["g-eng"]
    assert rows(merged.edges) == Counter([EDGES[1]])
    assert merged.tenant_id == "t-1" and merged.verified_domains == ["contoso.com"]


def test_incremental_changes_need_a_previous_snapshot():
    with pytest.raises(ValueError, match="read everything"):
        apply_changes(None, changes_of())


def test_no_change_returns_the_same_frames(small):
    merged = apply_changes(small, changes_of())
    for attribute in ("users", "groups", "edges"):
        pd.testing.assert_frame_equal(getattr(merged, attribute), getattr(small, attribute))


def test_netting_a_round_last_change_wins():
    users = [
        {"id": "a", "jobTitle": "x"}, {"id": "b", "@removed": {"reason": "changed"}},  # soft-deleted: gone too
        {"id": "c", "@removed": {"reason": "deleted"}}, {"id": "c", "displayName": "Restored"},
        {"id": "a", "@removed": {"reason": "deleted"}},
    ]
    groups = [
        {"id": "g", "displayName": "G", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": "m1"}]},
        {"id": "g", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": "m1", "@removed": {"reason": "deleted"}},
                                      {"@odata.type": "#microsoft.graph.orgContact", "id": "m2"}]},
        {"id": "h", "displayName": "H", "members@delta": [{"@odata.type": "#microsoft.graph.device", "id": "m3"}]},
        {"id": "h", "@removed": {"reason": "changed"}},
    ]
    changes = _changes(False, users, groups, DeltaLinks("u", "g"),
                       dict(tenant_id="t", organization="O", verified_domains=[], initial_domain=None))

    assert changes.users == [{"id": "c", "displayName": "Restored"}]
    assert changes.removed_users == ["b", "a"]
    assert changes.groups == [{"id": "g", "displayName": "G"}] and changes.removed_groups == ["h"]
    assert changes.added_edges == [("g", "m2", "orgContact")] and changes.removed_edges == [("g", "m1")]


# -- property: any mutations, read by delta and merged, equal a full extract ---------------------------------------

OPERATIONS = ("add_user", "update_user", "delete_user", "add_group", "rename_group", "delete_group", "add_member", "remove_member")
MUTATION = st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 10_000), st.integers(0, 10_000), st.booleans())


def mutate(tenant, operation: str, a: int, b: int, flag: bool) -> None:
    users, groups = sorted(tenant.users), sorted(tenant.groups)
    if operation == "add_user":
        local = f"p{a}.{tenant.sequence}"
        tenant.add_user(userPrincipalName=f"{local}@contoso.com", mail=None if flag else f"{local}@contoso.com", jobTitle="New" if flag else None)
    elif operation == "update_user" and users:
        fields = [{"displayName": f"Name {b}"}, {"jobTitle": None if flag else f"Title {b}"}, {"accountEnabled": flag},
                  {"mail": None, "userPrincipalName": f"re{b}@fabrikam.com"}][b % 4]
        tenant.update_user(users[a % len(users)], **fields)
    elif operation == "delete_user" and users:
        tenant.delete_user(users[a % len(users)])
    elif operation == "add_group":
        tenant.add_group(f"Group {a}")
    elif operation == "rename_group" and groups:
        tenant.rename_group(groups[a % len(groups)], f"Renamed {b}")
    elif operation == "delete_group" and groups and flag:  # half as often: keep some groups around
        tenant.delete_group(groups[a % len(groups)])
    elif operation == "add_member" and groups:
        candidates = [users, groups, sorted(tenant.others)][b % 3] or users
        if candidates:
            tenant.add_member(groups[a % len(groups)], candidates[b % len(candidates)])
    elif operation == "remove_member" and groups:
        members = tenant.members[groups[a % len(groups)]]
        if members:
            tenant.remove_member(groups[a % len(groups)], members[b % len(members)])


@pytest.fixture
def property_graph(emulator, make_client):
    emulator.delta_page_objects, emulator.delta_page_links = 10, 25  # many pages, split groups
    return emulator, make_client()


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(MUTATION, max_size=10), min_size=1, max_size=3))
def test_random_mutations_read_by_delta_and_merged_equal_a_full_extract(property_graph, batches):
    emulator, client = property_graph
    tenant = emulator.tenant = generate_tenant(users=45, groups=9, memberships=120, seed=5)  # same app credentials
    snapshot, changes = first_read(client)
    assert_same_tenant(snapshot, client.extract())
    for batch in batches:
        for mutation in batch:
            mutate(tenant, *mutation)
        changes = client.read_changes(changes.links)
        assert not changes.full
        snapshot = apply_changes(snapshot, changes)
        assert_same_tenant(snapshot, client.extract())
