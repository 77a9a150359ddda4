"""The SCIM client against the Atlassian-flavoured sandbox: real HTTPS on loopback, no mocks."""

from __future__ import annotations

import threading

import pytest
import requests

import guardsync.scim as scim
from guardsync.errors import ConfigError, ApiError, AuthError, Conflict, GuardsyncError, NotFound, TransientError
from guardsync.models import DesiredUser
from guardsync.sandbox.http import Fault, SandboxCA
from guardsync.sandbox.scim_server import AtlassianScimServer
from guardsync.scim import ScimClient

API_KEY = "sandbox-key-4f9a1c7e"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return SandboxCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_file))
    server = AtlassianScimServer(ca, API_KEY, {"example.com"}).start()
    yield server
    server.stop()


@pytest.fixture
def client(server):
    return ScimClient(server.scim_url, API_KEY)


@pytest.fixture
def pauses(monkeypatch):
    """The delays the client waited between retries (recorded, not slept: no wall-clock)."""
    waited: list[float] = []
    monkeypatch.setattr(scim, "_pause", waited.append)
    return waited


def a_user(n: int = 1, **changes) -> DesiredUser:
    fields = dict(
        external_id=f"entra-{n}",
        user_name=f"user{n}@example.com",
        display_name=f"User {n}",
        given_name="User",
        family_name=str(n),
        title="Engineer",
        active=True,
    )
    return DesiredUser(**{**fields, **changes})


def seed_users(server: AtlassianScimServer, count: int) -> list[str]:
    return [
        server.add_user({"userName": f"seed{i}@example.com", "emails": [{"value": f"seed{i}@example.com", "primary": True}]})["id"]
        for i in range(count)
    ]


def raw(server, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, server.scim_url + path, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)


# -- users -----------------------------------------------------------------------


def test_create_find_and_replace_a_user(server, client):
    created = client.create_user(a_user(1))

    assert created["id"]
    assert created["userName"] == "user1@example.com"
    assert created["emails"] == [{"value": "user1@example.com", "type": "work", "primary": True}]
    assert created["name"] == {"givenName": "User", "familyName": "1"}
    assert client.find_user(external_id="entra-1")["id"] == created["id"]
    assert client.find_user(user_name="USER1@Example.COM")["id"] == created["id"]  # userName is case-insensitive
    assert client.find_user(external_id="ENTRA-1") is None  # externalId is case-sensitive
    assert client.find_user(user_name="nobody@example.com") is None

    replaced = client.replace_user(created["id"], a_user(1, user_name="renamed@example.com", title="", active=False))

    stored = client.get_user(created["id"])
    assert replaced["userName"] == stored["userName"] == "renamed@example.com"
    assert stored["emails"][0]["value"] == "renamed@example.com"
    assert stored["active"] is False
    assert "title" not in stored  # PUT sends the whole user: an empty title clears it
    assert [u["id"] for u in server.users()] == [created["id"]]


def test_username_taken_in_another_case_is_a_conflict(client):
    client.create_user(a_user(1, user_name="bob@example.com"))

    with pytest.raises(Conflict) as caught:
        client.create_user(a_user(2, user_name="BOB@example.com"))

    assert caught.value.status == 409


def test_unverified_email_domain_shows_atlassians_words(client):
    with pytest.raises(ApiError) as caught:
        client.create_user(a_user(1, user_name="eve@unverified.org"))

    assert caught.value.status == 400
    assert caught.value.code == "invalidValue"
    assert "'unverified.org' is not verified" in str(caught.value)
    assert "POST /Users" in str(caught.value)


def test_unknown_user_is_not_found(client):
    with pytest.raises(NotFound):
        client.get_user("does-not-exist")


@pytest.mark.parametrize("tricky", ['o"brien\\x@example.com', 'back\\slash\\@example.com', 'q"uo"te@example.com'])
def test_filter_values_are_escaped(client, tricky):
    created = client.create_user(a_user(7, user_name=tricky))

    assert client.find_user(user_name=tricky)["id"] == created["id"]
    # Unescaped, this would become `userName eq "a" or userName pr ""` and match everyone.
    assert client.find_user(user_name='a" or userName pr "') is None
    assert client.find_user(external_id='x" or externalId pr "') is None


# -- groups ----------------------------------------------------------------------


def test_group_create_find_duplicate_and_delete(server, client):
    group = client.create_group("Engineering", "entra-group-1")

    assert client.find_group("engineering")["id"] == group["id"]
    assert client.get_group(group["id"])["externalId"] == "entra-group-1"
    with pytest.raises(Conflict):
        client.create_group("ENGINEERING", "entra-group-2")

    client.delete_group(group["id"])

    assert client.find_group("Engineering") is None
    assert server.groups() == []
    with pytest.raises(NotFound):
        client.delete_group(group["id"])


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_server_refuses_to_rename_a_group(server, client, method):
    group = client.create_group("Old name", "entra-group-1")
    body = (
        {"schemas": [CORE_GROUP], "displayName": "New name"}
        if method == "PUT"
        else {"schemas": [scim.PATCH_OP], "Operations": [{"op": "replace", "path": "displayName", "value": "New name"}]}
    )

    answer = raw(server, method, f"/Groups/{group['id']}", json=body)

    assert answer.status_code == 400
    assert answer.json()["status"] == "400"  # a string, as Atlassian and RFC 7644 send it
    assert "not supported" in answer.json()["detail"]
    assert [g["displayName"] for g in server.groups()] == ["Old name"]


def test_patch_members_packs_100_changes_a_request(server, client):
    user_ids = seed_users(server, 250)
    group = client.create_group("Everyone", "entra-group-1")
    server.reset_counts()

    assert client.patch_members(group["id"], add=user_ids, remove=[]) == 3

    assert server.requests["PATCH /Groups/{id}"] == 3
    assert client.requests_made["PATCH /Groups/{id}"] == 3
    assert sorted(m["value"] for m in client.get_group(group["id"])["members"]) == sorted(user_ids)

    assert client.patch_members(group["id"], add=[], remove=user_ids[:120]) == 2

    assert sorted(m["value"] for m in client.get_group(group["id"])["members"]) == sorted(user_ids[120:])
    assert client.patch_members(group["id"], add=[], remove=[]) == 0
    assert server.requests["PATCH /Groups/{id}"] == 5


def test_patch_members_mixes_adds_and_removes_in_one_request(server, client):
    first, second, third = seed_users(server, 3)
    group = server.add_group("Mixed", [first, second])

    assert client.patch_members(group["id"], add=[third], remove=[first]) == 1

    assert sorted(m["value"] for m in client.get_group(group["id"])["members"]) == sorted([second, third])


# -- paging and the server's limits --------------------------------------------------


def test_iter_users_pages_by_100(server, client):
    seeded = seed_users(server, 250)
    server.reset_counts()

    listed = [u["id"] for u in client.iter_users()]

    assert sorted(listed) == sorted(seeded)
    assert len(listed) == 250
    assert client.requests_made["GET /Users"] == 3
    assert server.requests["GET /Users"] == 3


def test_iter_groups_lists_every_group(server, client):
    for n in range(3):
        client.create_group(f"Group {n}", f"entra-group-{n}")

    assert sorted(g["displayName"] for g in client.iter_groups()) == ["Group 0", "Group 1", "Group 2"]


def test_server_serves_at_most_100_a_page(server):
    seed_users(server, 120)

    page = raw(server, "GET", "/Users", params={"count": 500}).json()

    assert page["totalResults"] == 120
    assert page["itemsPerPage"] == len(page["Resources"]) == 100


def test_server_answers_whole_with_a_content_length(server, client):
    """One write per answer (the benchmark's floor depends on it): no chunked framing, and the
    declared length is the body's, for a created resource, an error and an empty 204."""
    group = client.create_group("Whole answers", "entra-whole")
    answers = [
        raw(server, "POST", "/Groups", json={"schemas": [CORE_GROUP], "displayName": "Another", "externalId": "e2"}),
        raw(server, "GET", "/Users", params={"filter": 'userName sw "a"'}),
        raw(server, "PATCH", f"/Groups/{group['id']}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "externalId", "value": "entra-whole-2"}]}),
    ]

    assert [a.status_code for a in answers] == [201, 400, 204]
    for answer in answers:
        assert "Transfer-Encoding" not in answer.headers
        assert int(answer.headers.get("Content-Length", 0)) == len(answer.content)


@pytest.mark.parametrize(
    "path, expression",
    [("/Users", 'emails.value eq "a@example.com"'), ("/Users", 'userName sw "a"'), ("/Groups", 'externalId eq "x"')],
)
def test_server_refuses_other_filters(server, path, expression):
    answer = raw(server, "GET", path, params={"filter": expression})

    assert answer.status_code == 400
    assert answer.json()["scimType"] == "invalidFilter"


# -- failures ----------------------------------------------------------------------


def test_rejected_key_says_what_to_do_and_hides_the_key(server):
    client = ScimClient(server.scim_url, "expired-key-0d1e2f")

    with pytest.raises(AuthError) as caught:
        client.find_user(user_name="user1@example.com")

    message = str(caught.value)
    assert "one year" in message and "regenerate" in message
    for text in (message, repr(caught.value), repr(client), str(vars(client))):
        assert "expired-key-0d1e2f" not in text
    assert server.requests["GET /Users"] == 1


def test_429_honours_retry_after(server, client, pauses):
    server.inject(Fault("GET", r"/Users\?", status=429, headers={"Retry-After": "1"}))

    assert client.find_user(user_name="nobody@example.com") is None

    assert pauses == [1.0]
    assert client.requests_made["GET /Users"] == 2
    assert server.requests["GET /Users"] == 2


def test_500_is_retried(server, client, pauses):
    client.create_user(a_user(1))
    server.inject(Fault("GET", r"/Users\?", status=500, times=2))

    assert client.find_user(external_id="entra-1")["userName"] == "user1@example.com"

    assert len(pauses) == 2
    assert all(0 <= p <= scim.BACKOFF_CAP for p in pauses)
    assert server.requests["GET /Users"] == 3


def test_retries_stop_at_the_budget(server, pauses):
    client = ScimClient(server.scim_url, API_KEY, max_retry_seconds=5)
    server.inject(Fault("GET", r"/Users\?", status=503, times=1000, headers={"Retry-After": "10"}))

    with pytest.raises(TransientError) as caught:
        client.find_user(user_name="user1@example.com")

    # Waiting 10 s would overrun the 5 s budget: give up at once, and pass the wait on.
    assert caught.value.retry_after == 10.0
    assert "503" in str(caught.value)
    assert pauses == []
    assert server.requests["GET /Users"] == 1


def test_a_refused_first_contact_is_a_configuration_error_not_retried(ca, monkeypatch, pauses):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_file))
    gone = AtlassianScimServer(ca, API_KEY, {"example.com"}).start()
    url = gone.scim_url
    gone.stop()
    client = ScimClient(url, API_KEY, max_retry_seconds=30)

    with pytest.raises(ConfigError) as caught:
        client.get_user("any")

    assert "scim_url" in str(caught.value) and url in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert client.requests_made["GET /Users/{id}"] == 1 and not pauses


def test_resets_after_first_contact_are_retried(server, client, pauses):
    client.find_user(user_name="nobody@example.com")  # contact made
    server.inject(Fault("GET", r"/Users/", reset=True, times=3))

    with pytest.raises(NotFound):  # after three resets, the server's real answer
        client.get_user("any")

    assert client.requests_made["GET /Users/{id}"] == 4 and len(pauses) == 3


def test_lost_answer_to_a_user_post_does_not_duplicate(server, client, pauses):
    fault = server.inject(Fault("POST", r"/Users\?", status=504, after_serving=True))

    created = client.create_user(a_user(1))

    assert fault.times == 0 and len(pauses) == 1
    assert [u["id"] for u in server.users()] == [created["id"]]
    assert created["externalId"] == "entra-1"
    assert server.requests["POST /Users"] == 1  # the lookup found it: no second POST


def test_lost_answer_to_a_group_post_does_not_duplicate(server, client, pauses):
    fault = server.inject(Fault("POST", r"/Groups\?", status=504, after_serving=True))

    created = client.create_group("Engineering", "entra-group-1")

    assert fault.times == 0 and len(pauses) == 1
    assert [g["id"] for g in server.groups()] == [created["id"]]
    assert server.requests["POST /Groups"] == 1


def test_post_refused_by_429_is_sent_again(server, client, pauses):
    fault = server.inject(Fault("POST", r"/Users\?", status=429, headers={"Retry-After": "0"}))

    created = client.create_user(a_user(1))

    assert fault.times == 0 and pauses == [0.0]
    assert [u["id"] for u in server.users()] == [created["id"]]
    assert server.requests["POST /Users"] == 2
    assert server.requests["GET /Users"] == 0  # a 429 was not applied: no lookup needed


# -- dry run and threads ----------------------------------------------------------------


def test_dry_run_refuses_every_write_and_sends_nothing(server):
    existing = server.add_user({"userName": "a@example.com", "emails": [{"value": "a@example.com", "primary": True}]})
    group = server.add_group("G", [existing["id"]])
    dry = ScimClient(server.scim_url, API_KEY, dry_run=True)
    writes = [
        ("POST /Users", lambda: dry.create_user(a_user(1))),
        (f"PUT /Users/{existing['id']}", lambda: dry.replace_user(existing["id"], a_user(1))),
        ("POST /Groups", lambda: dry.create_group("New", "entra-group-9")),
        (f"PATCH /Groups/{group['id']}", lambda: dry.patch_members(group["id"], [existing["id"]], [])),
        (f"DELETE /Groups/{group['id']}", lambda: dry.delete_group(group["id"])),
    ]

    for refused, write in writes:
        with pytest.raises(GuardsyncError, match=f"^dry-run: refused {refused}$"):
            write()

    assert server.total() == 0
    assert dry.requests_made == {}
    assert dry.find_user(user_name="a@example.com")["id"] == existing["id"]
    assert server.total() == server.requests["GET /Users"] == 1


def test_counts_are_exact_across_threads(server, client):
    def lookups():
        for _ in range(10):
            client.find_user(user_name="nobody@example.com")

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert client.requests_made["GET /Users"] == 40
    assert server.requests["GET /Users"] == 40
