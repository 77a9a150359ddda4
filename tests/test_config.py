"""Configuration errors: one line on stderr naming the key and the fix, exit 1, before any write.

Errors found before a flow run starts (the file, its keys and values, missing secret
variables and files) are checked through `guardsync.cli.main` in-process; errors only
Entra or Atlassian can reveal (an unverified domain, an unknown group, a wrong app id)
through a real `guardsync sync --config FILE` subprocess that uses the test session's
Prefect server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from guardsync.cli import main
from guardsync.errors import ConfigError
from guardsync.sandbox.stack import to_toml

GUARDSYNC = str(Path(sys.executable).with_name("guardsync"))
WRITES = ("POST", "PUT", "PATCH", "DELETE")


# -- helpers (also used by test_secrets.py and test_kill.py) ----------------------------------


def cli_env(sandbox, prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a guardsync child: the sandbox's CA and secrets, no telemetry, its own Prefect home,
    and the test session's Prefect server (a child killed with SIGKILL then leaves no temporary server behind)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GUARDSYNC_SANDBOX_"))}
    env.update(sandbox.environment())
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=PREFECT_API_URL.value(),
    )
    env.update(extra)
    return env


def write_config(path: Path, config: dict) -> Path:
    path.write_text(to_toml(config), encoding="utf-8")
    return path


def run_cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([GUARDSYNC, *args], env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """guardsync's own error lines (Prefect's run log may precede them on stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("guardsync:")]


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- errors found before any network ---------------------------------------------------------------


def _edit(config: dict, section: str, key: str, value) -> dict:
    edited = {name: dict(values) for name, values in config.items()}
    if value is None:
        edited[section].pop(key, None)
    else:
        edited.setdefault(section, {})[key] = value
    return edited


PRE_FLOW_CASES = [
    # (id, edit of the sandbox configuration, words the line must hold: the key, then the fix)
    ("unknown-key", lambda c: _edit(c, "sync", "grops", ["Pilot"]), ["[sync] grops", "unknown key", "did you mean 'groups'"]),
    ("unknown-section", lambda c: {**c, "atlasian": {"x": 1}}, ["[atlasian]", "unknown key", "did you mean 'atlassian'"]),
    ("bad-identifier", lambda c: _edit(c, "sync", "identifier", "mail"), ["[sync] identifier", "'upn' or 'email'"]),
    ("bad-max-deactivations", lambda c: _edit(c, "sync", "max_deactivations", "ten percent"),
     ["[sync] max_deactivations", "percentage like"]),
    ("bad-group-size", lambda c: _edit(c, "sync", "max_group_size", 0), ["[sync] max_group_size", "greater than or equal to 1"]),
    ("http-scim-url", lambda c: _edit(c, "atlassian", "scim_url", "http://api.atlassian.com/scim/directory/x"),
     ["[atlassian] scim_url", "https://"]),
    ("http-graph-url", lambda c: _edit(c, "entra", "graph_url", "http://graph.microsoft.com"), ["[entra] graph_url", "https://"]),
    ("missing-client-id", lambda c: _edit(c, "entra", "client_id", None), ["[entra] client_id", "missing; add it"]),
    ("secret-and-certificate", lambda c: _edit(c, "entra", "certificate_path", "app.pem"),
     ["[entra]", "exactly one of client_secret or certificate_path"]),
    ("missing-secret-variable", lambda c: _edit(c, "entra", "client_secret", "env:NO_SUCH_VARIABLE_X"),
     ["entra.client_secret", "NO_SUCH_VARIABLE_X", "export it"]),
    ("missing-api-key-variable", lambda c: _edit(c, "atlassian", "api_key", "env:NO_SUCH_KEY_VARIABLE"),
     ["atlassian.api_key", "NO_SUCH_KEY_VARIABLE", "export it"]),
    ("missing-certificate-file", lambda c: _edit(_edit(c, "entra", "client_secret", None), "entra", "certificate_path", "/nonexistent/app.pem"),
     ["certificate_path", "/nonexistent/app.pem", "PEM file"]),
]


@pytest.mark.parametrize("case_id, edit, words", PRE_FLOW_CASES, ids=[case[0] for case in PRE_FLOW_CASES])
def test_a_configuration_error_is_one_line_with_the_key_and_the_fix(case_id, edit, words, sandbox, tmp_path, capsys):
    path = write_config(tmp_path / "guardsync.toml", edit(sandbox.config(f"sqlite:///{tmp_path / 'state.db'}")))
    status, out, err = run_main(["sync", "--config", str(path)], capsys)
    assert status == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("guardsync: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sandbox.graph.total() == 0 and sandbox.scim.total() == 0  # found before any network
    assert not (tmp_path / "state.db").exists()


def test_a_pasted_secret_is_refused_and_never_echoed(sandbox, tmp_path, capsys):
    pasted = "Xy8Q~" + "s3cr3t-value-pasted-into-the-file"
    config = _edit(sandbox.config(f"sqlite:///{tmp_path / 'state.db'}"), "entra", "client_secret", pasted)
    status, out, err = run_main(["sync", "--config", str(write_config(tmp_path / "g.toml", config))], capsys)
    assert status == 1 and err.count("\n") == 1
    assert "[entra] client_secret" in err and "env:VARIABLE or prefect:SECRET_BLOCK" in err
    assert pasted not in err + out and "s3cr3t" not in err + out


@pytest.mark.parametrize("text, words", [
    ("[entra\ntenant_id = 'x'", ["not valid TOML", "line"]),
    (None, ["not found", "--config"]),
])
def test_a_broken_or_missing_file_is_one_line(text, words, tmp_path, capsys):
    path = tmp_path / "guardsync.toml"
    if text is not None:
        path.write_text(text)
    status, out, err = run_main(["sync", "--config", str(path)], capsys)
    assert status == 1 and out == "" and len(err.splitlines()) == 1
    assert all(word in err for word in words), err


# -- errors only the services reveal: through the real command line ------------------------------


@pytest.mark.parametrize(
    "edit, words",
    [
        pytest.param(lambda c: _edit(c, "sync", "domains", ["partner.example"]),
                     ["[sync] domains", "partner.example not verified", "verify it in Entra ID or remove it"], id="unverified-domain"),
        pytest.param(lambda c: _edit(c, "sync", "groups", ["No Such Group"]),
                     ["[sync] groups", "No Such Group", "check the spelling or use its object id"], id="unknown-group"),
        pytest.param(lambda c: _edit(c, "entra", "client_id", "99999999-9999-4999-8999-999999999999"),
                     ["entra.client_id", "AADSTS700016"], id="wrong-client-id"),
        pytest.param(lambda c: _edit(c, "entra", "tenant_id", "nosuchtenant.onmicrosoft.com"),
                     ["entra.tenant_id", "nosuchtenant.onmicrosoft.com"], id="wrong-tenant"),
    ],
)
def test_errors_found_by_the_run_are_one_line_and_write_nothing(edit, words, sandbox, tmp_path, prefect_server):
    config = edit(sandbox.config(f"sqlite:///{tmp_path / 'state.db'}"))
    result = run_cli(["sync", "--config", str(write_config(tmp_path / "guardsync.toml", config))],
                     cli_env(sandbox, tmp_path / "prefect-home"))
    assert result.returncode == 1, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.stderr
    assert scim_writes(sandbox) == 0


def test_a_missing_prefect_secret_block_names_the_key(sandbox, state_url, sync):
    config = _edit(sandbox.config(state_url), "atlassian", "api_key", "prefect:no-such-secret-block")
    from guardsync.config import parse_settings

    status, exc = sync(parse_settings(config))
    assert status == 1 and isinstance(exc, ConfigError)
    assert "atlassian.api_key" in str(exc) and "no-such-secret-block" in str(exc) and "prefect block create secret" in str(exc)
    assert scim_writes(sandbox) == 0 and sandbox.graph.total() == 0


# -- unreachable URLs -------------------------------------------------------------------------------


def _never_retry(*_args, **_kwargs):
    raise AssertionError("a refused first contact was retried as if transient (120 s of retries, then 2 task retries)")


@pytest.mark.parametrize("key", ["authority_host", "graph_url"])
def test_an_unreachable_entra_url_fails_at_once_naming_the_key(key, sandbox, state_url, sync, monkeypatch):
    from guardsync.config import parse_settings
    from guardsync.graph import GraphClient

    monkeypatch.setattr(GraphClient, "_pause", _never_retry)
    config = _edit(sandbox.config(state_url), "entra", key, f"https://127.0.0.1:{closed_port()}")
    status, exc = sync(parse_settings(config))
    assert status == 1 and isinstance(exc, ConfigError), repr(exc)
    assert f"entra.{key}" in str(exc) or f"[entra] {key}" in str(exc)
    assert scim_writes(sandbox) == 0


def test_an_unreachable_scim_url_fails_at_once_naming_the_key(sandbox, state_url, sync, monkeypatch):
    import guardsync.scim
    from guardsync.config import parse_settings

    monkeypatch.setattr(guardsync.scim, "_pause", _never_retry)
    config = _edit(sandbox.config(state_url), "atlassian", "scim_url", f"https://127.0.0.1:{closed_port()}/scim/directory/x")
    status, exc = sync(parse_settings(config))
    assert status == 1 and isinstance(exc, ConfigError), repr(exc)
    assert "scim_url" in str(exc)
