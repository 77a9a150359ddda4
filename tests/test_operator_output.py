"""What an operator reads: one summary on the terminal, quiet logs, and each update's diff
(plan-changes, the dry run, the drift artifact), read back as a person would."""

import io
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import requests

from guardsync.changes import AttributeChange, user_changes
from guardsync.models import DesiredUser
from guardsync.sandbox.stack import to_toml
from guardsync.summary import RunSummary

LIMIT_LINE = "no global concurrency limit"


def artifacts_of(flow_run_id: str) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found if artifact.key}


def logs_of(flow_run_id: str) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def test_a_sync_prints_one_summary_and_the_limit_line_at_most_once(sandbox, state_url, prefect_server, tmp_path):
    """As a person runs it (a process, Prefect's INFO logs on), the summary is on the terminal once;
    the run's log in Prefect still ends with it. The no-limit line is debug: shown once when asked for."""
    from prefect.settings import PREFECT_API_URL

    config = tmp_path / "guardsync.toml"
    config.write_text(to_toml(sandbox.config(state_url)), encoding="utf-8")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "DEBUG"}  # the README's way to see the line
    guardsync = Path(sys.executable).with_name("guardsync")
    done = subprocess.run([str(guardsync), "sync", "--config", str(config)], env=env, capture_output=True, text=True,
                          timeout=600)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    assert "Task run 'load-users" in terminal  # Prefect's INFO logs did reach the terminal
    assert terminal.count("Summary of run") == 1, terminal
    assert done.stdout.count("users created") == 1
    assert terminal.count(LIMIT_LINE) == 1, terminal  # three loads wrote; said once
    run_id = next(line for line in done.stdout.splitlines() if line.startswith("Summary of run")).split()[3]
    assert sum("Summary of run" in message for message in logs_of(run_id)) == 1  # the run's own log keeps it


def _rename_and_retitle(sandbox) -> tuple[str, str, str]:
    """A synced user renamed and retitled in Entra: (Entra id, old userName, new userName)."""
    user_id, user = next((uid, u) for uid, u in sorted(sandbox.tenant.users.items())
                         if u["accountEnabled"] and u["userType"] == "Member" and (u.get("mail") or "").endswith(".com")
                         and u["jobTitle"])
    old = user["userPrincipalName"]
    local, domain = old.split("@")
    new = f"{local}.renamed@{domain}"
    sandbox.tenant.update_user(user_id, userPrincipalName=new, mail=new, jobTitle="Chief Tester")
    return user_id, old, new, user["jobTitle"]


def test_plan_changes_names_the_attributes_an_update_changes(sandbox, state_url, sync):
    status, first = sync(sandbox.settings(state_url))
    assert status == 0 and first.counts["users_created"] > 0
    user_id, old, new, old_title = _rename_and_retitle(sandbox)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0 and summary.counts["users_updated"] >= 1

    table = [{key: html.unescape(str(value)) for key, value in row.items()}  # cells as the UI shows them
             for row in json.loads(artifacts_of(summary.run_id)["plan-changes"].data)]
    update = next(row for row in table if row["object"] == "user" and row["name"] == new)
    assert update["change"] == "update"
    assert f'userName: "{old}" -> "{new}"' in update["detail"]
    assert f'emails.work: "{old}" -> "{new}"' in update["detail"]
    assert f'title: "{old_title}" -> "Chief Tester"' in update["detail"]
    assert "displayName" not in update["detail"]  # unchanged attributes are not named
    for secret in (sandbox.tenant.client_secret, sandbox.api_key):
        assert secret not in json.dumps(table)
    summary_artifact = artifacts_of(summary.run_id)["summary"].data
    assert "| object | created | updated |" in summary_artifact and "| users |" in summary_artifact


def test_the_dry_run_prints_each_update_with_its_diff(sandbox, state_url, sync):
    from guardsync.cli import run_flow
    from guardsync.config import parse_settings

    assert sync(sandbox.settings(state_url))[0] == 0
    _, old, new, old_title = _rename_and_retitle(sandbox)
    out = io.StringIO()
    assert run_flow(parse_settings(sandbox.config(state_url), source="test"), dry_run=True, out=out) == 0
    printed = out.getvalue()
    line = next(line for line in printed.splitlines() if line.strip().startswith(f"update user {new}"))
    assert f'userName: "{old}" -> "{new}"' in line and f'title: "{old_title}" -> "Chief Tester"' in line
    assert printed.count("Summary of run") == 1 and "(dry-run, completed)" in printed


def test_the_drift_artifact_names_the_attribute_edited_by_hand(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    victim = sorted(sandbox.scim.users(), key=lambda u: u["userName"])[0]
    edited = {key: value for key, value in victim.items() if key != "meta"}
    edited["title"] = "Edited By Hand"
    response = requests.put(f"{sandbox.scim.scim_url}/Users/{victim['id']}", json=edited, verify=str(sandbox.ca.ca_file),
                            headers={"Authorization": f"Bearer {sandbox.api_key}"})
    assert response.status_code == 200, response.text
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0
    assert any(f"{victim['userName']} (title)" in line for line in summary.drift), summary.drift
    drift = html.unescape(artifacts_of(summary.run_id)["drift"].data)  # names are written as character references
    written = json.dumps(victim.get("title")) if victim.get("title") else "(none)"
    assert f'| {victim["userName"]} | title | {written} | "Edited By Hand" |' in drift, drift


# -- the pure parts ----------------------------------------------------------------------------------


def _user(**changes) -> DesiredUser:
    base = dict(external_id="e1", user_name="uma@contoso.com", display_name="Uma Wagner", given_name="Uma",
                family_name="Wagner", title="", active=True)
    return DesiredUser(**{**base, **changes})


def test_a_diff_names_only_what_atlassian_would_hold_differently():
    assert user_changes(_user(), _user()) == []
    assert user_changes(_user(), _user(family_name="Weber")) == [AttributeChange("name.familyName", "Wagner", "Weber")]
    assert [str(c) for c in user_changes(_user(), _user(active=False))] == ["active: true -> false"]
    assert [str(c) for c in user_changes(_user(title="CTO"), _user())] == ['title: "CTO" -> (none)']
    assert str(AttributeChange("password", "hunter2", "hunter3")) == "password: (secret) -> (secret, changed)"


def test_the_summary_artifact_puts_what_stopped_the_run_first():
    blocked = RunSummary("r", "sync", "blocked", "upn", message="blocked by max_deactivations: 40 > 10",
                         excluded={"guest": 2}).markdown()
    assert blocked.index("## Blocked") < blocked.index("## Changes") and "40 &#62; 10" in blocked
    assert "| reason | users |\n|---|---|\n| guest | 2 |" in blocked
    failed = RunSummary("r", "sync", "failed", "upn", failures=["PUT user a@contoso.com: 400 a | b"],
                        counts={"users_created": 3}).markdown()
    assert failed.index("## Failed writes: 1") < failed.index("## Changes")
    assert "| 1 | PUT user a&#64;contoso&#46;com&#58; 400 a &#124; b |" in failed  # a pipe in a cell does not split it
    assert "| users | 3 | 0 | 0 | 0 | 0 |" in failed
    completed = RunSummary("r", "sync", "completed", "upn").markdown()
    assert "## Blocked" not in completed and "## Failed" not in completed
