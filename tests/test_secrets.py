"""Secrets never leak; TLS is always verified.

Known secret values are planted (the Entra client secret, a certificate's private key,
the Atlassian SCIM API key, and the access tokens the emulator issues) and looked for in
everything a run leaves: stdout/stderr of a CLI run (at DEBUG), Python log records of
every logger (urllib3 and msal included), the Prefect run's logs, artifacts and
parameters read back through the Prefect API, the Prefect server's database and result
storage, exception strings, reprs and tracebacks of failing runs, and every table of the
state store.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sqlite3
import traceback
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

import flows.sync_directory  # noqa: F401 - Prefect configures logging on import: before caplog attaches, not during a test
from guardsync.config import parse_settings
from guardsync.errors import AuthError, ConfigError
from guardsync.sandbox.http import SandboxCA
from guardsync.sandbox.scim_server import AtlassianScimServer
from guardsync.sandbox.stack import API_KEY_ENV, ORG_KEY_ENV, SECRET_ENV
from tests.conftest import task_run_events
from tests.test_config import cli_env, error_lines, run_cli, scim_writes, write_config

REPOSITORY = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("guardsync", "flows", "tasks")
WRONG_SECRET = "Wr0ng~SecretValue.planted-for-the-leak-test"
WRONG_KEY = "ATSCIM-wrong-key-planted-for-the-leak-test"
WRONG_ORG_KEY = "ATORG-wrong-org-key-planted-for-the-leak-test"


# -- the planted secrets ----------------------------------------------------------------------


def make_certificate(path: Path) -> tuple[bytes, str]:
    """An app key and self-signed certificate in one PEM file; (certificate PEM, private key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "guardsync-leak-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(key_pem + cert_pem)
    path.chmod(0o600)
    return cert_pem, key_pem.decode()


def key_fragments(key_pem: str) -> list[str]:
    """Pieces of the private key's base64 body, found however a leak re-wraps its lines."""
    body = "".join(line for line in key_pem.splitlines() if not line.startswith("-----"))
    return [body[i : i + 48] for i in range(64, len(body) - 48, 240)]


def normalised(text: str) -> str:
    """Whitespace and JSON-escaped newlines removed, so a re-wrapped PEM or token is still found."""
    return re.sub(r"\s+", "", text.replace("\\n", "").replace("\\r", ""))


class Secrets:
    def __init__(self, sandbox, key_pem: str | None = None):
        self.sandbox = sandbox
        self.key_pem = key_pem

    def values(self) -> dict[str, str]:
        named = {"entra client secret": self.sandbox.tenant.client_secret, "scim api key": self.sandbox.api_key,
                 "organization api key": self.sandbox.org_api_key,
                 "wrong secret": WRONG_SECRET, "wrong key": WRONG_KEY, "wrong organization key": WRONG_ORG_KEY}
        if self.key_pem:
            named.update({f"private key part {i}": part for i, part in enumerate(key_fragments(self.key_pem))})
        for i, token in enumerate(list(self.sandbox.graph._tokens)):  # every access token issued so far
            named[f"access token {i}"] = token
        return named

    def assert_absent(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        assert text, f"nothing to search in {where}"
        flat = normalised(text)
        for name, value in self.values().items():
            assert value not in text and normalised(value) not in flat, f"{name} leaked into {where}"


@pytest.fixture
def secrets_sandbox(make_sandbox):
    return make_sandbox(users=60, groups=8, seed=23)


@pytest.fixture
def certificate_settings(secrets_sandbox, tmp_path):
    """Settings that sign in with a certificate; returns (settings, Secrets)."""
    cert_pem, key_pem = make_certificate(tmp_path / "app.pem")
    secrets_sandbox.tenant.certificate_pem = cert_pem
    config = secrets_sandbox.config(f"sqlite:///{tmp_path / 'state.db'}")
    del config["entra"]["client_secret"]
    config["entra"]["certificate_path"] = str(tmp_path / "app.pem")
    return config, Secrets(secrets_sandbox, key_pem)


def run_flow(settings):
    """(flow run id, final state, exception or None): the run as Prefect records it."""
    from flows.sync_directory import sync_directory

    state = sync_directory(settings=settings, return_state=True)
    exception = None
    if state.is_failed():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - the failure is what is inspected
            exception = exc
    return state.state_details.flow_run_id, state, exception


def prefect_records(flow_run_id) -> str:
    """Everything the Prefect server holds about one flow run: logs, artifacts, parameters, states."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # run logs travel in batches: send them before reading them back
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
    task_runs = task_run_events(flow_run_id, at_least={"extract"}, wait_seconds=20)  # states, inputs, results
    assert logs and artifacts, "the run left logs and artifacts to search"
    parts = [log.message for log in logs]
    parts += [f"{a.key} {a.description} {a.data}" for a in artifacts]
    parts.append(repr(flow_run.parameters))
    parts.append(repr(flow_run.state))
    parts += [json.dumps(event) for event in task_runs]
    return "\n".join(parts)


def prefect_storage() -> str:
    """The Prefect server's database and this process's result storage, as text."""
    import os

    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    texts = []
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    for path in [database, database.with_name(database.name + "-wal"), *Path(os.environ["PREFECT_HOME"]).rglob("*")]:
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(texts)


def state_store_dump(db_path: Path) -> str:
    """Every row of every table of the SQLite state store, plus the raw file bytes."""
    connection = sqlite3.connect(db_path)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"users", "groups", "members", "audit", "runs"} <= set(tables)
        rows = [f"{table}: {row!r}" for table in tables for row in connection.execute(f'SELECT * FROM "{table}"')]
    finally:
        connection.close()
    raw = [p.read_bytes().decode("utf-8", errors="replace") for p in db_path.parent.glob(db_path.name + "*")]
    return "\n".join(rows + raw)


def exception_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), repr(exc.args), repr(vars(exc)), *traceback.format_exception(exc)])


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "msal", "requests", "guardsync", "prefect", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def log_text(caplog) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


def test_the_leak_detector_finds_what_it_looks_for(secrets_sandbox, tmp_path):
    """The searches below can fail: a planted value is found verbatim, re-wrapped or JSON-escaped."""
    _, key_pem = make_certificate(tmp_path / "probe.pem")
    secrets = Secrets(secrets_sandbox, key_pem)
    rewrapped = "\\n".join(key_pem[i : i + 50] for i in range(0, len(key_pem), 50))  # another wrap, JSON-escaped
    for text in (f"x {secrets_sandbox.api_key} y", f"secret={secrets_sandbox.tenant.client_secret}", rewrapped):
        with pytest.raises(AssertionError, match="leaked"):
            secrets.assert_absent("probe", text)
    secrets.assert_absent("probe", "nothing secret here")


# -- in-process runs: logs, Prefect records, state store, exceptions -------------------------------


def test_a_certificate_run_leaks_nothing(certificate_settings, secrets_sandbox, tmp_path, debug_logs, prefect_server):
    config, secrets = certificate_settings
    flow_run_id, state, exc = run_flow(parse_settings(config))
    assert state.is_completed(), exc
    assert len(secrets_sandbox.scim.users()) > 30 and secrets_sandbox.graph._tokens  # a real run, real tokens
    secrets.assert_absent("log records", log_text(debug_logs))
    assert any("127.0.0.1" in r.getMessage() for r in debug_logs.records if r.name.startswith("urllib3"))  # DEBUG was on
    secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
    secrets.assert_absent("Prefect database and result storage", prefect_storage())
    secrets.assert_absent("state store", state_store_dump(tmp_path / "state.db"))


def test_a_secret_run_with_a_refused_write_leaks_nothing(secrets_sandbox, tmp_path, debug_logs, prefect_server):
    from guardsync.sandbox.http import Fault

    secrets = Secrets(secrets_sandbox)
    secrets_sandbox.scim.inject(Fault("POST", r"/Users\?$", 400, times=1,
                                      body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"400","detail":"bad"}'))
    flow_run_id, state, exc = run_flow(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}"))
    assert state.is_failed() and exc is not None
    secrets.assert_absent("exception", exception_text(exc))
    secrets.assert_absent("log records", log_text(debug_logs))
    secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
    secrets.assert_absent("state store", state_store_dump(tmp_path / "state.db"))


@pytest.mark.parametrize("wrong", ["client secret", "scim key", "certificate"])
def test_failing_credentials_leak_nothing(wrong, certificate_settings, secrets_sandbox, tmp_path, debug_logs, monkeypatch,
                                          prefect_server):
    config, secrets = certificate_settings
    if wrong == "client secret":
        config = secrets_sandbox.config(f"sqlite:///{tmp_path / 'state.db'}")
        monkeypatch.setenv(SECRET_ENV, WRONG_SECRET)
    elif wrong == "scim key":
        monkeypatch.setenv(API_KEY_ENV, WRONG_KEY)
    else:
        _, other_key = make_certificate(tmp_path / "other.pem")  # a certificate Entra does not know
        secrets.key_pem += other_key
        config["entra"]["certificate_path"] = str(tmp_path / "other.pem")
    flow_run_id, state, exc = run_flow(parse_settings(config))
    assert state.is_failed() and isinstance(exc, AuthError), repr(exc)
    advice = {"client secret": "entra.client_secret", "scim key": "one year", "certificate": "entra.certificate_path"}[wrong]
    assert advice in str(exc)
    secrets.assert_absent("exception", exception_text(exc))
    secrets.assert_absent("log records", log_text(debug_logs))
    secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
    assert secrets_sandbox.scim.users() == [] and secrets_sandbox.scim.groups() == []


ACCESS = {"Engineering All": ["jira-software", "confluence"], "Pilot": ["jira-servicemanagement@contoso.atlassian.net"]}


def test_a_run_with_product_access_leaks_no_organization_key(secrets_sandbox, tmp_path, debug_logs, prefect_server):
    secrets = Secrets(secrets_sandbox)
    flow_run_id, state, exc = run_flow(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}", ACCESS))
    assert state.is_completed(), exc
    assert secrets_sandbox.org.grants() and secrets_sandbox.org.writes() >= 3  # a real run that granted products
    secrets.assert_absent("log records", log_text(debug_logs))
    secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
    secrets.assert_absent("Prefect database and result storage", prefect_storage())
    dump = state_store_dump(tmp_path / "state.db")
    assert "access_grants:" in dump  # the grants table was searched too
    secrets.assert_absent("state store", dump)


def test_a_refused_organization_key_leaks_nothing(secrets_sandbox, tmp_path, debug_logs, monkeypatch, prefect_server):
    secrets = Secrets(secrets_sandbox)
    monkeypatch.setenv(ORG_KEY_ENV, WRONG_ORG_KEY)
    flow_run_id, state, exc = run_flow(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}", ACCESS))
    assert state.is_failed() and isinstance(exc, AuthError) and "[access] api_key (401)" in str(exc), repr(exc)
    secrets.assert_absent("exception", exception_text(exc))
    secrets.assert_absent("log records", log_text(debug_logs))
    secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
    assert secrets_sandbox.scim.users() == [] and secrets_sandbox.org.grants() == {}


def test_the_clients_hold_no_secret_in_their_repr(secrets_sandbox):
    from guardsync.admin import AdminClient

    admin = AdminClient(secrets_sandbox.org.base_url, secrets_sandbox.org.org_id, "d", secrets_sandbox.org_api_key)
    assert secrets_sandbox.org_api_key not in repr(admin) + repr(vars(admin)) + repr(vars(admin._session))
    from guardsync.graph import GraphClient
    from guardsync.scim import ScimClient

    scim = ScimClient(secrets_sandbox.scim.scim_url, secrets_sandbox.api_key)
    assert secrets_sandbox.api_key not in repr(scim) + repr(vars(scim))
    graph = GraphClient(tenant_id=secrets_sandbox.tenant.tenant_id, client_id=secrets_sandbox.tenant.client_id,
                        client_secret=secrets_sandbox.tenant.client_secret, authority_host=secrets_sandbox.graph.authority_host,
                        graph_url=secrets_sandbox.graph.graph_url)
    assert secrets_sandbox.tenant.client_secret not in repr(graph)
    graph.close()


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["certificate ok", "wrong secret", "wrong key", "access ok", "wrong organization key"])
def test_the_command_line_prints_no_secret_even_at_debug(case, certificate_settings, secrets_sandbox, tmp_path, prefect_server):
    config, secrets = certificate_settings
    extra = {"PREFECT_LOGGING_LEVEL": "DEBUG", "PREFECT_LOGGING_ROOT_LEVEL": "DEBUG"}
    if case in ("access ok", "wrong organization key"):
        config["access"] = secrets_sandbox.config("unused", ACCESS)["access"]
    if case == "wrong organization key":
        extra[ORG_KEY_ENV] = WRONG_ORG_KEY
    if case == "wrong secret":
        config = secrets_sandbox.config(f"sqlite:///{tmp_path / 'state.db'}")
        extra[SECRET_ENV] = WRONG_SECRET
    elif case == "wrong key":
        extra[API_KEY_ENV] = WRONG_KEY
    home = tmp_path / "prefect-home"
    result = run_cli(["sync", "--config", str(write_config(tmp_path / "guardsync.toml", config))],
                     cli_env(secrets_sandbox, home, **extra))
    assert result.returncode == (0 if case in ("certificate ok", "access ok") else 1), result.stderr[-3000:]
    if case in ("certificate ok", "access ok"):
        assert "users created" in result.stdout
        if case == "access ok":
            assert "product access granted 3" in result.stdout
    else:
        assert len(error_lines(result.stderr)) == 1
    assert "DEBUG" in result.stderr  # the child really logged at DEBUG
    secrets.assert_absent("stdout and stderr", result.stdout + result.stderr)
    storage = "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in home.rglob("*") if p.is_file())
    if storage:
        secrets.assert_absent("the child's Prefect home (results)", storage)
    secrets.assert_absent("state store", state_store_dump(tmp_path / "state.db"))
    secrets.assert_absent("Prefect database (the child's run logs and artifacts)", prefect_storage())


# -- TLS -------------------------------------------------------------------------------------------


INSECURE = re.compile(r"verify\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False|_create_unverified_context|"
                      r"disable_warnings|InsecureRequestWarning|PYTHONHTTPSVERIFY|CURL_CA_BUNDLE\s*=\s*['\"]{2}")


def test_tls_verification_is_never_turned_off_in_the_code():
    sources = [p for d in SOURCE_DIRS for p in (REPOSITORY / d).rglob("*.py")]
    assert len(sources) > 20
    offenders = [f"{p.relative_to(REPOSITORY)}:{n}: {line.strip()}" for p in sources
                 for n, line in enumerate(p.read_text().splitlines(), 1) if INSECURE.search(line)]
    assert offenders == []


def test_a_custom_ca_bundle_is_honoured(secrets_sandbox, tmp_path, monkeypatch, sync):
    """A bundle holding a corporate CA and the CA that signs the servers: the run verifies and completes."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + Path(secrets_sandbox.ca.ca_file).read_bytes())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    status, summary = sync(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}"))
    assert status == 0, summary
    assert len(secrets_sandbox.scim.users()) > 30


def _never_retry(*_args, **_kwargs):
    raise AssertionError("an untrusted certificate was retried as if transient")


def test_an_untrusted_graph_certificate_is_refused_at_once(secrets_sandbox, tmp_path, monkeypatch, sync):
    from guardsync.graph import GraphClient

    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    monkeypatch.setattr(GraphClient, "_pause", _never_retry)
    status, exc = sync(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}"))
    assert status == 1 and isinstance(exc, ConfigError), repr(exc)
    assert "TLS verification of 127.0.0.1 failed" in str(exc) and "REQUESTS_CA_BUNDLE" in str(exc)
    assert secrets_sandbox.graph.total() == 0 and scim_writes(secrets_sandbox) == 0


def test_an_untrusted_scim_certificate_is_refused_at_once(secrets_sandbox, tmp_path, monkeypatch, sync):
    import guardsync.scim

    impostor = AtlassianScimServer(SandboxCA(tmp_path / "impostor-ca"), secrets_sandbox.api_key, {"contoso.com", "fabrikam.com"}).start()
    try:
        monkeypatch.setattr(guardsync.scim, "_pause", _never_retry)
        config = secrets_sandbox.config(f"sqlite:///{tmp_path / 'state.db'}")
        config["atlassian"]["scim_url"] = impostor.scim_url
        status, exc = sync(parse_settings(config))
        assert status == 1 and isinstance(exc, ConfigError), repr(exc)
        assert "[atlassian] scim_url" in str(exc) and "TLS verification" in str(exc) and "REQUESTS_CA_BUNDLE" in str(exc)
        assert impostor.total() == 0  # no request got through: the API key never left
        assert impostor.users() == []
    finally:
        impostor.stop()


def test_a_next_link_to_another_host_never_gets_the_token(secrets_sandbox, tmp_path, sync):
    """A page whose @odata.nextLink points elsewhere (a proxy bug, a poisoned cache): refused, not followed."""
    import json

    from guardsync.sandbox.http import Fault

    elsewhere = AtlassianScimServer(secrets_sandbox.ca, "unused", {"contoso.com"}).start()  # trusted: a request would land
    try:
        secrets_sandbox.graph.inject(Fault("GET", r"^/v1\.0/users(/delta)?\?(?!.*deltatoken)", 200, times=10**6,
                                           body=json.dumps({"value": [], "@odata.nextLink": f"{elsewhere.base_url}/v1.0/users?$skiptoken=x"})))
        status, exc = sync(secrets_sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}"))
        assert status == 1, exc
        assert "refusing to follow" in str(exc)
        assert elsewhere.total() == 0
        assert scim_writes(secrets_sandbox) == 0
    finally:
        elsewhere.stop()


# -- a database password in the state URL -----------------------------------------------------------

PLANTED_PASSWORD = "PlantedDbPassw0rd-leak-test"


def test_a_password_in_a_literal_state_url_is_refused(secrets_sandbox, tmp_path):
    """The settings are the flow's parameters, stored by Prefect and shown in its UI: no password may sit in them."""
    config = secrets_sandbox.config(f"postgresql+psycopg://guardsync:{PLANTED_PASSWORD}@127.0.0.1:5432/guardsync_x")
    with pytest.raises(ConfigError) as caught:
        parse_settings(config)
    message = str(caught.value)
    assert "[sync] state" in message and "env:" in message
    assert PLANTED_PASSWORD not in message + repr(caught.value)


def test_a_state_url_with_a_password_through_env_leaks_nothing(secrets_sandbox, tmp_path, monkeypatch, debug_logs,
                                                                prefect_server):
    import sqlalchemy

    admin = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    name = "guardsync_test_secrets"
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        # The loopback server trusts its clients, so the planted password is sent but not needed.
        monkeypatch.setenv("GUARDSYNC_TEST_STATE_URL", f"postgresql+psycopg://postgres:{PLANTED_PASSWORD}@127.0.0.1:5432/{name}")
        flow_run_id, state, exc = run_flow(secrets_sandbox.settings("env:GUARDSYNC_TEST_STATE_URL"))
        assert state.is_completed(), exc
        secrets = Secrets(secrets_sandbox)
        planted = {"database password": PLANTED_PASSWORD}
        secrets.values = lambda original=secrets.values: {**original(), **planted}
        secrets.assert_absent("log records", log_text(debug_logs))
        secrets.assert_absent("Prefect logs, artifacts and parameters", prefect_records(flow_run_id))
        secrets.assert_absent("Prefect database and result storage", prefect_storage())
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://guardsync@127.0.0.1:5432/guardsync_x?password={PLANTED_PASSWORD}",
    f"postgresql+psycopg://guardsync@127.0.0.1:5432/guardsync_x?sslmode=require&sslpassword={PLANTED_PASSWORD}",
], ids=["password", "sslpassword"])
def test_a_password_in_a_state_url_query_is_refused(secrets_sandbox, url):
    with pytest.raises(ConfigError) as caught:
        parse_settings(secrets_sandbox.config(url))
    message = str(caught.value)
    assert "[sync] state" in message and "?password=" in message and "env:VARIABLE" in message
    assert PLANTED_PASSWORD not in message + repr(caught.value)


def test_a_query_password_from_a_secret_reference_is_never_printed(secrets_sandbox, fresh_postgres, tmp_path, monkeypatch,
                                                                    capsys):
    """Through env:, the URL is allowed; wherever it is printed (check, an error opening it) its password is not."""
    from guardsync.cli import main
    from guardsync.state import StateStore

    unreachable = fresh_postgres.replace("127.0.0.1:5432", "127.0.0.1:1") + f"?password={PLANTED_PASSWORD}"
    with pytest.raises(ConfigError) as caught:
        StateStore(unreachable)
    assert "cannot open" in str(caught.value) and "password=***" in str(caught.value)
    assert PLANTED_PASSWORD not in exception_text(caught.value)

    monkeypatch.setenv("GUARDSYNC_TEST_STATE_URL", f"{fresh_postgres}?password={PLANTED_PASSWORD}")
    config = write_config(tmp_path / "g.toml", secrets_sandbox.config("env:GUARDSYNC_TEST_STATE_URL"))
    main(["check", "--config", str(config)])
    out, err = capsys.readouterr()
    assert "password=***" in out, out
    assert PLANTED_PASSWORD not in out + err
