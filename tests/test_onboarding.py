"""Onboarding: `guardsync init`, `guardsync check` against the sandbox, and the terminal output.

`check` runs over real HTTPS against the sandbox (Graph emulator and Atlassian SCIM
server); each prerequisite is broken for real (a wrong secret, a role taken out of the
emulator's tokens, a bound state store...), never mocked.

Terminals: the progress bar and `init`'s questions are tested on a real pseudo-terminal
(the `pty` module), so rich and `isatty()` detect the terminal by themselves; the
summary table uses rich's `force_terminal=True` on a string buffer (what is drawn is the
same, only the detection differs, and that is covered by the pty tests).
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from guardsync.cli import main
from guardsync.config import load_settings
from guardsync.check import ITEMS
from guardsync.progress import print_summary_table, progress_reporter
from guardsync.sandbox.stack import API_KEY_ENV, SECRET_ENV, to_toml
from guardsync.state import StateStore
from guardsync.summary import RunSummary

GUARDSYNC = Path(sys.executable).with_name("guardsync")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\w+)\s+(.*)$")
TENANT = "0c3a6a4e-2b9d-4d8e-9f0a-3c2b1a0d9e8f"
CLIENT = "5f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def run(argv, capsys) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# == init ==========================================================================================


def init_args(output: Path, *extra: str) -> list[str]:
    return ["init", "--tenant-id", TENANT, "--client-id", CLIENT, "--client-secret-ref", "env:ENTRA_CLIENT_SECRET",
            "--scim-url", "https://api.atlassian.com/scim/directory/3f0e9a1b", "--api-key-ref", "prefect:atlassian-scim-key",
            "--output", str(output), *extra]


@pytest.fixture
def no_terminal(monkeypatch):
    """stdin is not a terminal (as in CI), whatever runs the tests."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def test_init_writes_a_commented_file_that_loads_with_the_given_values(tmp_path, capsys, no_terminal):
    output = tmp_path / "guardsync.toml"
    status, out, err = run(init_args(output, "--group", "Pilot", "--group", "Pilot Champions", "--domain", "contoso.com",
                                      "--identifier", "email", "--state", "sqlite:///state.db"), capsys)
    assert status == 0, err
    settings = load_settings(output)
    assert (settings.entra.tenant_id, settings.entra.client_id) == (TENANT, CLIENT)
    assert settings.entra.client_secret == "env:ENTRA_CLIENT_SECRET" and settings.entra.certificate_path is None
    assert settings.atlassian.scim_url == "https://api.atlassian.com/scim/directory/3f0e9a1b"
    assert settings.atlassian.api_key == "prefect:atlassian-scim-key"
    assert settings.sync.groups == ["Pilot", "Pilot Champions"] and settings.sync.domains == ["contoso.com"]
    assert settings.sync.identifier == "email" and settings.sync.state == "sqlite:///state.db"
    text = output.read_text()
    assert "# max_group_size = 10000" in text and "# certificate_path" in text  # optional keys, commented
    for permission in ("User.Read.All", "GroupMember.Read.All", "Group.Read.All", "Domain.Read.All", "Organization.Read.All"):
        assert permission in out
    assert "Application" in out and "admin consent" in out
    assert f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id={CLIENT}" in out


def test_init_with_a_certificate_and_a_sovereign_cloud(tmp_path, capsys, no_terminal):
    output = tmp_path / "gov.toml"
    argv = [a for a in init_args(output) if a not in ("--client-secret-ref", "env:ENTRA_CLIENT_SECRET")]
    status, out, err = run(argv + ["--certificate-path", "app.pem", "--authority-host", "https://login.microsoftonline.us",
                                   "--graph-url", "https://graph.microsoft.us"], capsys)
    assert status == 0, err
    settings = load_settings(output)
    assert settings.entra.certificate_path == "app.pem" and settings.entra.client_secret is None
    assert settings.sync.groups == []  # no --group: all users; init says so
    assert "ALL users and groups" in out
    assert f"https://login.microsoftonline.us/{TENANT}/adminconsent?client_id={CLIENT}" in out


@pytest.mark.parametrize("flag,pasted", [
    ("--client-secret-ref", "Xy8Q~kT3vN.pasted_client_secret_value"),
    ("--client-secret-ref", "env:Xy8Q~kT3vN.pasted"),  # a secret behind a prefix is still a secret
    ("--api-key-ref", "ATCTT3xFfGN0pastedApiKeyValue=1234"),
])
def test_init_refuses_a_pasted_secret(tmp_path, capsys, no_terminal, flag, pasted):
    output = tmp_path / "guardsync.toml"
    argv = init_args(output)
    argv[argv.index(flag) + 1] = pasted
    status, out, err = run(argv, capsys)
    assert status == 1
    assert "must be a reference" in err and "env:VARIABLE" in err
    assert pasted not in out + err  # never echoed
    assert not output.exists()


def test_init_refuses_to_overwrite_an_existing_file_without_force(tmp_path, capsys, no_terminal):
    output = tmp_path / "guardsync.toml"
    output.write_text("# mine\n")
    status, _, err = run(init_args(output), capsys)
    assert status == 1 and "already exists" in err and "--force" in err
    assert output.read_text() == "# mine\n"
    status, _, err = run(init_args(output, "--force"), capsys)
    assert status == 0, err
    assert load_settings(output).entra.tenant_id == TENANT


def test_init_without_a_terminal_names_the_missing_flags(tmp_path, capsys, no_terminal):
    status, _, err = run(["init", "--tenant-id", TENANT, "--output", str(tmp_path / "x.toml")], capsys)
    assert status == 1
    assert "--client-id" in err and "--scim-url" in err and "--api-key-ref" in err and "--client-secret-ref" in err
    assert not (tmp_path / "x.toml").exists()


def on_pty(argv: list[str], typed: str, cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin/stdout/stderr, type `typed`, return (status, what it showed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color"}
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    os.write(master, typed.encode())
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=10), shown.decode(errors="replace")


def test_init_asks_for_what_is_missing_on_a_terminal_and_refuses_a_pasted_secret(tmp_path):
    answers = [
        CLIENT,  # client id (tenant id comes from the flag)
        "",  # credential: secret (the default)
        "Xy8Q~kT3vN.pasted_client_secret_value",  # a pasted secret: refused, asked again
        "env:MY_ENTRA_SECRET",
        "https://api.atlassian.com/scim/directory/3f0e9a1b",
        "",  # api key reference: the default env:ATLASSIAN_SCIM_API_KEY
        "Pilot",  # pilot groups
        "",  # domains: all verified
        "upn",
        "",  # state: the default next to the file
    ]
    status, shown = on_pty([str(GUARDSYNC), "init", "--tenant-id", TENANT, "--output", "asked.toml"],
                           "\n".join(answers) + "\n", tmp_path)
    assert status == 0, shown
    assert "Application (client) id" in shown and "must be a reference" in shown
    settings = load_settings(tmp_path / "asked.toml")
    assert settings.entra.client_id == CLIENT and settings.entra.client_secret == "env:MY_ENTRA_SECRET"
    assert settings.atlassian.api_key == "env:ATLASSIAN_SCIM_API_KEY" and settings.sync.groups == ["Pilot"]
    assert settings.sync.state == f"sqlite:///{tmp_path / 'guardsync-state.db'}"
    assert "pasted_client_secret" not in (tmp_path / "asked.toml").read_text()


# == check =========================================================================================


def write_config(sandbox, directory: Path, state_url: str, **sync) -> Path:
    path = directory / "guardsync.toml"
    path.write_text(to_toml(sandbox.config(state_url, **sync)), encoding="utf-8")
    return path


def checklist(out: str) -> dict[str, tuple[str, str, str]]:
    """item -> (status, detail, fix) from `guardsync check` output."""
    items, last = {}, None
    for line in out.splitlines():
        if match := LINE.match(line):
            last = match[2]
            items[last] = (match[1], match[3], "")
        elif line.strip().startswith("fix: ") and last:
            status, detail, _ = items[last]
            items[last] = (status, detail, line.strip().removeprefix("fix: "))
    return items


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def test_check_passes_every_item_against_the_sandbox_and_writes_nothing(sandbox, state_url, tmp_path, capsys):
    config = write_config(sandbox, tmp_path, state_url, groups=["Pilot"])
    status, out, err = run(["check", "--config", str(config)], capsys)
    items = checklist(out)
    assert list(items) == list(ITEMS), out
    assert all(status == "PASS" for status, _, _ in items.values()), out
    assert status == 0, out + err
    assert "Contoso Ltd" in items["tenant"][1] and sandbox.tenant.tenant_id in items["tenant"][1]
    assert "contoso.com" in items["tenant"][1] and "fabrikam.com" in items["domains"][1]
    assert "Pilot (" in items["groups"][1]
    assert "Domain.Read.All" in items["permissions"][1]  # read from the token's roles claim
    # Nothing written: no SCIM write, one GET of /Users, no state file created.
    assert scim_writes(sandbox) == 0 and sandbox.scim.total("GET") == 1
    assert not Path(state_url.removeprefix("sqlite:///")).exists()
    assert sandbox.tenant.client_secret not in out + err and sandbox.api_key not in out + err

    # All users and all groups, and a store already bound to this tenant and directory: still all PASS.
    store = StateStore(state_url)
    store.bind(sandbox.tenant.tenant_id, sandbox.scim.scim_url)
    store.dispose()
    config = write_config(sandbox, tmp_path, state_url)
    status, out, _ = run(["check", "--config", str(config)], capsys)
    assert status == 0, out
    assert "all 10 groups" in checklist(out)["groups"][1] and "bound to tenant" in checklist(out)["state"][1]


def break_secret(sandbox, monkeypatch, state_url):
    monkeypatch.setenv(SECRET_ENV, "not-the-client-secret")
    return {}


def break_role(sandbox, monkeypatch, state_url):
    sandbox.graph.granted_roles.remove("Domain.Read.All")
    return {}


def break_domain(sandbox, monkeypatch, state_url):
    return {"domains": ["contoso.com", "pending.contoso.com"]}  # added to the tenant, never verified


def break_group_name(sandbox, monkeypatch, state_url):
    return {"groups": ["Pilot", "Pilot Champs"]}


def break_group_size(sandbox, monkeypatch, state_url):
    return {"groups": ["Pilot"], "max_group_size": 10}


def break_scim_key(sandbox, monkeypatch, state_url):
    monkeypatch.setenv(API_KEY_ENV, "ATSCIM-not-the-key")
    return {}


def break_state(sandbox, monkeypatch, state_url):
    store = StateStore(state_url)
    store.bind("9d4b2c1a-0000-4000-8000-000000000000", sandbox.scim.scim_url)  # another tenant's store
    store.dispose()
    return {}


@pytest.mark.parametrize("breaks,item,says,fix", [
    (break_secret, "token", "AADSTS7000215", "Certificates & secrets"),
    (break_role, "permissions", "Domain.Read.All", "adminconsent?client_id="),
    (break_domain, "domains", "pending.contoso.com not verified", "verify pending.contoso.com"),
    (break_group_name, "groups", "no group named 'Pilot Champs'", "correct [sync] groups"),
    (break_group_size, "groups", "Pilot has", "split Pilot"),
    (break_scim_key, "atlassian", "401", "regenerate the API key"),
    (break_state, "state", "belongs to tenant_id 9d4b2c1a", "own store"),
], ids=["wrong-secret", "role-removed", "unverified-domain", "missing-group", "group-too-large", "wrong-scim-key",
        "state-of-another-tenant"])
def test_check_fails_exactly_the_broken_item_with_its_fix(make_sandbox, state_url, tmp_path, capsys, monkeypatch,
                                                           breaks, item, says, fix):
    sandbox = make_sandbox()
    sync = breaks(sandbox, monkeypatch, state_url)
    config = write_config(sandbox, tmp_path, state_url, **{"groups": ["Pilot"], **sync})
    binding_before = StateStore(state_url).binding() if Path(state_url.removeprefix("sqlite:///")).exists() else None

    status, out, err = run(["check", "--config", str(config)], capsys)
    items = checklist(out)
    assert status == 1, out
    assert list(items) == list(ITEMS), out
    failed = {name for name, (state, _, _) in items.items() if state == "FAIL"}
    assert failed == {item}, out
    assert says in items[item][1], out
    assert fix in items[item][2], out
    # The others pass, or, for a refused token, are not checked (they need one) rather than failed.
    depends = {"permissions", "tenant", "domains", "groups", "attributes"} if item == "token" else set()
    assert {name for name, (state, _, _) in items.items() if state == "SKIP"} == depends, out
    assert scim_writes(sandbox) == 0
    if binding_before is not None:
        assert StateStore(state_url).binding() == binding_before
    for secret in (sandbox.tenant.client_secret, sandbox.api_key, "not-the-client-secret", "ATSCIM-not-the-key"):
        assert secret not in out + err


def test_check_of_a_missing_or_invalid_file(tmp_path, capsys):
    status, out, _ = run(["check", "--config", str(tmp_path / "nope.toml")], capsys)
    items = checklist(out)
    assert status == 1 and items["configuration"][0] == "FAIL" and "guardsync init" in items["configuration"][2]
    assert all(state == "SKIP" for name, (state, _, _) in items.items() if name != "configuration")
    bad = tmp_path / "bad.toml"
    bad.write_text('[entra]\ntenant_id = "t"\nclient_id = "c"\nclient_secret = "Xy8Q~pasted"\n'
                   '[atlassian]\nscim_url = "https://x"\napi_key = "env:K"\n')
    status, out, _ = run(["check", "--config", str(bad)], capsys)
    assert status == 1 and "must be a reference" in checklist(out)["configuration"][1]
    assert "Xy8Q~pasted" not in out


# == terminal output ===============================================================================


def test_progress_without_a_terminal_prints_plain_lines_every_ten_percent():
    stream = io.StringIO()
    report = progress_reporter(stream)
    assert not report.draws
    for done in range(0, 1001, 50):
        report("users", done, 1000)
    report("groups", 0, 0)
    report.close()
    lines = stream.getvalue().splitlines()
    assert lines == [f"users: {n}/1000 ({n // 10}%)" for n in range(100, 1001, 100)] + ["groups: 0/0 (100%)"]
    assert "\x1b" not in stream.getvalue()


def test_progress_on_a_terminal_draws_a_bar(monkeypatch):
    """A real pseudo-terminal: rich sees isatty() true and draws; no force_terminal."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    master, slave = pty.openpty()
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        with progress_reporter(terminal) as report:
            assert report.draws
            for done in range(0, 501, 25):
                report("users", done, 500)
            report("memberships", 3, 10)  # left unfinished: close() ends the live display
        terminal.flush()
    reader.join(timeout=5)
    os.close(master)
    text = shown.decode(errors="replace")
    assert "\x1b[" in text and "━" in text  # escape sequences and bar glyphs
    assert "users" in text and "500/500" in text and "memberships" in text and "3/10" in text
    assert "users: 100/500 (20%)" not in text  # no plain lines on a terminal


def first_sync_summary() -> RunSummary:
    return RunSummary(run_id="r1", mode="sync", status="completed", identifier="upn",
                      counts={"users_created": 27, "groups_created": 1, "members_added": 27},
                      excluded={"guest": 1, "domain": 2}, new_groups=["Pilot"], first_sync=True)


def test_summary_plain_off_a_terminal_with_the_next_steps():
    stream = io.StringIO()
    summary = first_sync_summary()
    print_summary_table(summary, stream)
    text = stream.getvalue()
    assert text.splitlines()[: len(summary.lines())] == summary.lines()  # the contract's summary lines, as they are
    assert "SSO may now be set up" in text and "upn (userPrincipalName)" in text
    assert "need product access in Atlassian administration: Pilot" in text
    assert "\x1b" not in text


def test_summary_table_on_a_terminal(monkeypatch):
    """force_terminal=True on a buffer: rich draws exactly what it draws on a terminal."""
    stream = io.StringIO()
    print_summary_table(first_sync_summary(), stream, force_terminal=True)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "\x1b[" in stream.getvalue()
    assert re.search(r"users\s+.\s*created\s+.\s*27", text), text
    assert "SSO may now be set up" in text and "need product access in Atlassian administration: Pilot" in text
    assert "Summary of run" not in text  # the table, not the plain lines


def test_written_init_file_is_plain_toml(tmp_path, capsys, no_terminal):
    output = tmp_path / "guardsync.toml"
    assert run(init_args(output, "--group", 'Team "Q"\\west'), capsys)[0] == 0
    assert tomllib.loads(output.read_text())["sync"]["groups"] == ['Team "Q"\\west']
