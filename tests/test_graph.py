"""The Graph edge over real HTTPS on loopback: GraphClient against the Graph emulator.

No mocks: msal and requests talk TLS to the emulator, verified with the sandbox CA
through REQUESTS_CA_BUNDLE, exactly as in production.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import socket

import certifi
import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from guardsync.errors import ApiError, AuthError, ConfigError, NotFound, TransientError
from guardsync.graph import GraphClient, endpoint_pattern
from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS
from guardsync.sandbox.graph_emulator import GraphEmulator
from guardsync.sandbox.http import Fault, SandboxCA
from guardsync.sandbox.tenant import UNVERIFIED_DOMAIN, generate_tenant

TOKEN = "POST /{tenant}/oauth2/v2.0/token"
USERS = "GET /v1.0/users"
MEMBERS = "GET /v1.0/groups/{id}/members"
PAGE = 999


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return SandboxCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def tenant():
    # 2,100 users (3 pages) and groups big enough to need a second members page.
    return generate_tenant(users=2100, groups=20, memberships=6000, seed=11)


@pytest.fixture
def emulator(tenant, ca, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_file))
    server = GraphEmulator(tenant, ca).start()
    yield server
    server.stop()


@pytest.fixture
def make_client(emulator, tenant):
    clients = []

    def make(**overrides) -> GraphClient:
        settings = dict(
            tenant_id=tenant.initial_domain,
            client_id=tenant.client_id,
            client_secret=tenant.client_secret,
            authority_host=emulator.authority_host,
            graph_url=emulator.graph_url,
            max_retry_seconds=20.0,
        )
        settings.update(overrides)
        clients.append(GraphClient(**settings))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def graph_error(code: str, message: str = "sandbox fault") -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def expected_member_pages(tenant) -> int:
    return sum(max(1, math.ceil(len(members) / PAGE)) for members in tenant.members.values())


# -- extract ---------------------------------------------------------------------


def test_extract_reads_every_user_group_and_edge(make_client, emulator, tenant):
    assert max(len(m) for m in tenant.members.values()) > PAGE  # the fixture really pages members

    snapshot = make_client().extract()

    assert snapshot.tenant_id == tenant.tenant_id  # the GUID, though the client was given the domain
    assert snapshot.organization == tenant.organization
    assert list(snapshot.users.columns) == USER_COLUMNS
    assert list(snapshot.groups.columns) == GROUP_COLUMNS
    assert list(snapshot.edges.columns) == EDGE_COLUMNS

    users = snapshot.users.set_index("id")
    assert len(users) == len(tenant.users) == 2100
    assert set(users.index) == set(tenant.users)
    for user_id, user in list(tenant.users.items())[::97] + list(tenant.users.items())[-13:]:
        row = users.loc[user_id]
        assert row["userPrincipalName"] == user["userPrincipalName"]
        assert bool(row["accountEnabled"]) is user["accountEnabled"]
        assert row["userType"] == user["userType"]
        assert pd.isna(row["mail"]) if user["mail"] is None else row["mail"] == user["mail"]
    assert users["accountEnabled"].dtype == bool
    assert (~users["accountEnabled"]).sum() == sum(not u["accountEnabled"] for u in tenant.users.values())

    assert dict(zip(snapshot.groups["id"], snapshot.groups["displayName"])) == {
        g["id"]: g["displayName"] for g in tenant.groups.values()
    }
    edges = set(snapshot.edges.itertuples(index=False, name=None))
    expected = {(g, m, tenant.type_of(m)) for g, members in tenant.members.items() for m in members}
    assert edges == expected
    assert set(snapshot.edges["member_type"]) == {"user", "group", "device", "servicePrincipal", "orgContact"}

    assert set(snapshot.verified_domains) == {"contoso.com", "fabrikam.com", "contoso.onmicrosoft.com"}
    assert UNVERIFIED_DOMAIN not in snapshot.verified_domains
    assert snapshot.initial_domain == "contoso.onmicrosoft.com"


def test_extract_makes_exactly_one_request_per_page(make_client, emulator, tenant):
    client = make_client()
    client.extract()

    assert emulator.requests[USERS] == math.ceil(2100 / PAGE) == 3
    assert emulator.requests["GET /v1.0/groups"] == 1
    assert emulator.requests[MEMBERS] == expected_member_pages(tenant) > len(tenant.groups)
    assert emulator.requests["GET /v1.0/domains"] == emulator.requests["GET /v1.0/organization"] == 1
    assert emulator.requests[TOKEN] == 1
    assert client.requests_made == emulator.requests  # the client counts under the same keys


def test_one_token_request_serves_several_extracts(make_client, emulator):
    client = make_client()
    client.extract()
    client.extract()

    assert emulator.requests[TOKEN] == 1  # msal's cache, one application object per client
    assert emulator.requests[USERS] == 6


def test_tenant_guid_works_as_authority(make_client, tenant):
    snapshot = make_client(tenant_id=tenant.tenant_id).extract()
    assert len(snapshot.users) == len(tenant.users)


# -- authentication ------------------------------------------------------------------


def write_app_certificate(path, common_name="guardsync-test"):
    """A key and self-signed certificate as Entra app credentials are made; returns the cert PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(key_pem + cert_pem)
    return cert_pem


def test_certificate_auth(make_client, emulator, tenant, tmp_path):
    tenant.certificate_pem = write_app_certificate(tmp_path / "app.pem")

    snapshot = make_client(client_secret=None, certificate_path=str(tmp_path / "app.pem")).extract()

    assert len(snapshot.users) == len(tenant.users)
    assert emulator.requests[TOKEN] == 1


def test_unregistered_certificate_is_refused(make_client, emulator, tenant, tmp_path):
    tenant.certificate_pem = write_app_certificate(tmp_path / "registered.pem")
    write_app_certificate(tmp_path / "other.pem")

    with pytest.raises(AuthError) as refused:
        make_client(client_secret=None, certificate_path=str(tmp_path / "other.pem")).extract()

    assert "AADSTS700027" in str(refused.value)
    assert emulator.total("GET") - emulator.requests["GET /{tenant}/v2.0/.well-known/openid-configuration"] == 0


def test_wrong_secret_names_the_code_and_never_the_secret(make_client, emulator, tenant, caplog):
    wrong = "Wr0ng~secret-value-that-must-not-leak"
    caplog.set_level(logging.DEBUG)  # msal, urllib3 and ours: none may log the secret

    with pytest.raises(AuthError) as refused:
        make_client(client_secret=wrong).extract()

    message = str(refused.value)
    assert "AADSTS7000215" in message
    assert tenant.client_id in message and "entra.client_secret" in message
    assert wrong not in message and tenant.client_secret not in message
    assert "\n" not in message
    assert wrong not in caplog.text and tenant.client_secret not in caplog.text
    assert emulator.requests[TOKEN] == 1  # not retried: a wrong secret does not heal
    assert emulator.requests[USERS] == 0


def test_unknown_tenant_is_a_configuration_error(make_client):
    with pytest.raises(ConfigError) as wrong:
        make_client(tenant_id="nowhere.onmicrosoft.com").extract()
    assert "nowhere.onmicrosoft.com" in str(wrong.value) and "entra.tenant_id" in str(wrong.value)


def test_untrusted_tls_certificate_is_a_configuration_error(make_client, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only: the sandbox CA is not trusted

    with pytest.raises(ConfigError) as untrusted:
        make_client().extract()

    assert "REQUESTS_CA_BUNDLE" in str(untrusted.value)


def test_token_endpoint_throttling_is_retried(make_client, emulator, tenant):
    # msal replays a throttled answer from its cache until Retry-After passes; the client keeps trying.
    emulator.inject(Fault("POST", r"/oauth2/v2\.0/token", status=429, headers={"Retry-After": "1"}))
    emulator.inject(Fault("POST", r"/oauth2/v2\.0/token", status=503, headers={"Retry-After": "1"}))

    snapshot = make_client().extract()

    assert len(snapshot.users) == len(tenant.users)
    assert emulator.requests[TOKEN] == 3


def test_token_that_expires_mid_run_is_renewed(make_client, emulator, tenant):
    # Tokens die after 1 s while announcing an hour, so only Graph's 401 tells the client.
    # With 0.1 s per request and 2 member readers the run spans well over 18 requests' latency.
    emulator.token_lifetime = 1.0
    emulator.latency = 0.1

    snapshot = make_client(member_read_concurrency=2).extract()

    assert emulator.rejected_tokens >= 1
    assert emulator.requests[TOKEN] >= 2
    assert len(snapshot.users) == len(tenant.users)
    assert len(snapshot.edges) == sum(len(m) for m in tenant.members.values())


def test_401_twice_is_an_auth_error(make_client, emulator):
    emulator.inject(Fault("GET", r"^/v1\.0/organization\?", status=401, times=2, body=graph_error("InvalidAuthenticationToken")))

    with pytest.raises(AuthError) as refused:
        make_client().extract()

    assert "InvalidAuthenticationToken" in str(refused.value)
    assert emulator.requests[TOKEN] == 2  # the cached token was dropped and a fresh one tried once


def test_403_names_the_missing_permission(make_client, emulator):
    emulator.inject(Fault("GET", r"^/v1\.0/users\?", status=403, body=graph_error("Authorization_RequestDenied", "Insufficient privileges to complete the operation.")))

    with pytest.raises(AuthError) as denied:
        make_client().extract()

    assert "User.Read.All" in str(denied.value) and "admin consent" in str(denied.value)
    assert emulator.requests[USERS] == 1


# -- retries ---------------------------------------------------------------------------


def test_429_retry_after_is_honoured(make_client, emulator, tenant, caplog):
    emulator.inject(Fault("GET", r"^/v1\.0/users\?", status=429, headers={"Retry-After": "1"}, body=graph_error("TooManyRequests")))
    caplog.set_level(logging.WARNING, logger="guardsync.graph")

    snapshot = make_client().extract()

    assert len(snapshot.users) == len(tenant.users)
    assert emulator.requests[USERS] == 3 + 1
    assert "GET /v1.0/users: HTTP 429 TooManyRequests; retrying in 1.0 s" in caplog.text
    assert tenant.client_secret not in caplog.text
    assert not any(token in caplog.text for token in emulator._tokens)


def test_503_then_success(make_client, emulator, tenant):
    emulator.inject(Fault("GET", r"^/v1\.0/groups/[^/]+/members\?", status=503, times=2))

    snapshot = make_client().extract()

    assert len(snapshot.edges) == sum(len(m) for m in tenant.members.values())
    assert emulator.requests[MEMBERS] == expected_member_pages(tenant) + 2


def test_truncated_page_is_read_again(make_client, emulator, tenant):
    emulator.inject(Fault("GET", r"^/v1\.0/users\?.*skiptoken", status=200, body='{"value": [{"id": "7d2c'))

    snapshot = make_client().extract()

    assert set(snapshot.users["id"]) == set(tenant.users)
    assert emulator.requests[USERS] == 3 + 1


def test_a_refused_first_contact_is_a_configuration_error(make_client, emulator):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_graph = f"https://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused

    with pytest.raises(ConfigError) as wrong_url:
        make_client(graph_url=dead_graph, max_retry_seconds=60).extract()
    closed.close()

    assert "entra.graph_url" in str(wrong_url.value) and dead_graph in str(wrong_url.value)


def test_connection_failures_after_first_contact_are_retried_until_the_budget(make_client, emulator, caplog):
    caplog.set_level(logging.WARNING, logger="guardsync.graph")
    emulator.inject(Fault("GET", r"^/v1\.0/users\?", reset=True, times=10**6))

    with pytest.raises(TransientError) as gave_up:
        make_client(max_retry_seconds=1.5).extract()

    assert "ConnectionError" in str(gave_up.value)
    assert caplog.text.count("GET /v1.0/users: ConnectionError") >= 1  # retried, then gave up


def test_permanent_503_gives_up_within_the_budget(make_client, emulator):
    emulator.inject(Fault("GET", r"^/v1\.0/organization\?", status=503, times=10**6))

    with pytest.raises(TransientError) as gave_up:
        make_client(max_retry_seconds=1.5).extract()

    assert "GET /v1.0/organization" in str(gave_up.value) and "503" in str(gave_up.value)
    assert emulator.requests["GET /v1.0/organization"] >= 2  # it did retry before giving up


def test_retry_after_beyond_the_budget_gives_up_at_once(make_client, emulator):
    emulator.inject(Fault("GET", r"^/v1\.0/organization\?", status=429, headers={"Retry-After": "30"}, times=10**6))

    with pytest.raises(TransientError) as gave_up:
        make_client(max_retry_seconds=5).extract()

    assert gave_up.value.retry_after == 30
    assert emulator.requests["GET /v1.0/organization"] == 1


# -- permanent Graph errors -----------------------------------------------------------------


def test_top_out_of_range_is_an_api_error_with_graphs_code(make_client, emulator):
    with pytest.raises(ApiError) as refused:
        make_client().get("/users", {"$top": 1000})

    assert refused.value.status == 400
    assert refused.value.code == "Request_UnsupportedQuery"
    assert not isinstance(refused.value, NotFound)
    assert emulator.requests[USERS] == 1  # a 400 is not retried


def test_unknown_group_is_not_found(make_client):
    with pytest.raises(NotFound) as missing:
        make_client().direct_members("00000000-0000-4000-8000-000000000000")
    assert missing.value.code == "Request_ResourceNotFound"


def test_transitive_members_flatten_nesting_and_survive_cycles(make_client, tenant):
    pilot = next(g for g in tenant.groups.values() if g["displayName"] == "Pilot")["id"]
    client = make_client()

    members = client.read_all(f"/groups/{pilot}/transitiveMembers", {"$select": "id", "$top": 999})

    ids = [m["id"] for m in members]
    direct = set(tenant.members[pilot])
    assert direct < set(ids) and len(ids) == len(set(ids))
    assert all(m["@odata.type"].startswith("#microsoft.graph.") for m in members)


# -- pieces -------------------------------------------------------------------------------


def test_endpoint_pattern_collapses_ids():
    assert endpoint_pattern("GET", "/v1.0/groups/6f1c/members") == "GET /v1.0/groups/{id}/members"
    assert endpoint_pattern("GET", "/v1.0/users") == "GET /v1.0/users"
    assert endpoint_pattern("GET", "/v1.0/users/delta") == "GET /v1.0/users/delta"
    assert endpoint_pattern("POST", "/contoso.onmicrosoft.com/oauth2/v2.0/token") == TOKEN


def test_client_needs_exactly_one_credential(tenant):
    with pytest.raises(ConfigError):
        GraphClient(tenant_id=tenant.tenant_id, client_id=tenant.client_id)
    with pytest.raises(ConfigError):
        GraphClient(tenant_id=tenant.tenant_id, client_id=tenant.client_id, client_secret="x", certificate_path="app.pem")


def test_generated_tenant_has_the_awkward_records():
    tenant = generate_tenant()
    users = list(tenant.users.values())

    assert len(users) == 300 and len(tenant.groups) == 20
    assert sum("#EXT#" in u["userPrincipalName"] and u["userType"] == "Guest" for u in users) == 3
    assert sum(not u["accountEnabled"] for u in users) == 3
    assert sum(u["mail"] == "not-an-address" for u in users) == 1
    assert sum(u["userPrincipalName"].endswith("@" + UNVERIFIED_DOMAIN) for u in users) == 2
    mails = [u["mail"] for u in users if u["mail"] and "@" in u["mail"]]
    assert len(mails) - len({m.lower() for m in mails}) == 2  # two case-only twins
    assert any(g in tenant.members[g] for g in tenant.groups)  # self-nested
    assert any(a in tenant.members[b] and b in tenant.members[a] for a in tenant.groups for b in tenant.groups if a != b)
    assert set(tenant.others.values()) == {"device", "servicePrincipal", "orgContact"}
    pilot = next(g for g in tenant.groups.values() if g["displayName"] == "Pilot")["id"]
    assert sum(m in tenant.users for m in tenant.members[pilot]) == 30
    assert any(m in tenant.groups for m in tenant.members[pilot])
    assert UNVERIFIED_DOMAIN not in [d["id"] for d in tenant.domains]
    assert generate_tenant().users == tenant.users  # reproducible


def test_generator_scales_to_a_large_tenant():
    tenant = generate_tenant(users=100_000, groups=5_000, memberships=500_000, depth=4, bad_records=False)

    user_memberships = sum(1 for members in tenant.members.values() for m in members if m in tenant.users)
    assert len(tenant.users) == 100_000 and len(tenant.groups) == 5_000
    assert 490_000 <= user_memberships <= 510_000
