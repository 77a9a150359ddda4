"""Review of issues 15 and 16 (review-b): the worlds a careful operator meets, tried as they meet them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardsync.sandbox.http import Fault
from guardsync.sandbox.stack import to_toml
from tests.test_flow import expected_upns, group_id


def _cli(sandbox, config: dict, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """guardsync as a person runs it: a process, Prefect's INFO logs on."""
    from prefect.settings import PREFECT_API_URL

    path = tmp_path / "guardsync.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO",
           "GUARDSYNC_ERROR_LOG": str(tmp_path / "errors.log")}
    guardsync = Path(sys.executable).with_name("guardsync")
    return subprocess.run([str(guardsync), *args, "--config", str(path)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("world", ["dry-run", "blocked", "failed"])
def test_every_run_ends_with_its_summary_once(world, sandbox, state_url, prefect_server, tmp_path):
    """DESIGN: 'The last lines of a run are a summary with counts'; issue 16: one summary per run on the terminal."""
    config = sandbox.config(state_url)
    args = ["sync"]
    expected = 0
    if world == "dry-run":
        args.append("--dry-run")
    elif world == "blocked":
        config["sync"]["max_group_size"] = 1  # every group is larger: the guard blocks before any write
        expected = 3
    else:  # Atlassian refuses the key in the middle of the run: the run fails (exit 1) after it wrote
        sandbox.scim.inject(Fault("PATCH", r"/Groups", 401, times=1000,
                                  body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}'))
        expected = 1
    done = _cli(sandbox, config, tmp_path, *args)
    terminal = done.stdout + done.stderr
    assert done.returncode == expected, terminal[-3000:]
    assert terminal.count("Summary of run") == 1, terminal[-4000:]


class _RunsCodeWhenUnpickled:
    """What a forger puts in a result file: unpickling it touches a file (it could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_forged_result_file_naming_pickle_runs_no_code_on_a_retry(tmp_path):
    """README: 'someone who can write the storage cannot make a retry run code'. A retry's cached stage is read
    by Prefect's ResultStore from the result storage, as here, with guardsync's serializer configured."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import PickleSerializer

    from tasks.results import SERIALIZER

    storage, marker = tmp_path / "results", tmp_path / "code-ran"
    storage.mkdir()
    forged = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key="plan-key"),
                          result=_RunsCodeWhenUnpickled(marker))
    (storage / "plan-key").write_bytes(forged.serialize())  # the key of a persisted stage the retry will reuse

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)), serializer=SERIALIZER)
    try:
        store.read("plan-key")
    except Exception:
        pass  # refusing the file is right; running its code is not
    assert not marker.exists(), "a forged result file ran code when the retry read it"


def test_a_retry_after_beyond_the_budget_is_not_asked_again_sooner_by_the_task_retry(sandbox, state_url, sync,
                                                                                       monkeypatch):
    """Graph asks for a wait longer than [sync] retry_budget_seconds: the run fails at once with which setting
    (README), and the extract's task retry (sooner than the asked wait) must not send Graph the same requests
    again, the whole extract restarted (issue 15, item 7)."""
    import tasks.extract as extract_module  # the flow imports its stages where it runs them

    monkeypatch.setattr(extract_module, "extract", extract_module.extract.with_options(retry_delay_seconds=0))
    settings = sandbox.settings(state_url)
    tight = settings.model_copy(update={"sync": settings.sync.model_copy(update={"retry_budget_seconds": 2})})
    throttled = sandbox.graph.inject(Fault("GET", r"^/v1\.0/users", 429, times=10, headers={"Retry-After": "60"}))
    status, error = sync(tight)
    assert status == 1 and "retry_budget_seconds" in str(error)
    assert 10 - throttled.times == 1, f"Graph was asked {10 - throttled.times} times within the minute it asked to wait"


def test_the_dry_run_of_a_first_run_shows_what_each_adoption_changes(sandbox, state_url, sync):
    """A first run against a populated Atlassian: each adopted account's row names what the adoption changes
    there (the externalId it gains, a stale title, an upper-case userName), old -> new (issue 16)."""
    from tests.test_brownfield import PopulatedWorld

    world = PopulatedWorld(sandbox)
    status, preview = sync(sandbox.settings(state_url, max_deactivations=5), dry_run=True)
    assert status == 0, preview
    rows = {row["name"].casefold(): row for row in preview.plan_changes if row["object"] == "user"}  # the first 50
    stale = [rows[upn]["detail"] for upn in sorted(world.stale) if upn in rows]
    upper = [(upn, rows[upn.casefold()]["detail"]) for upn in world.other_case if upn.casefold() in rows]
    assert stale and upper, rows.keys()
    assert all('title: "Stale Title" -> ' in detail and "externalId: (none) -> " in detail for detail in stale), stale
    assert all(f'userName: "{upn.upper()}" -> "{upn}"' in detail for upn, detail in upper), upper


def test_the_dry_run_of_a_hand_over_names_the_account_and_what_changes_on_it(sandbox, state_url, sync):
    """An identifier handed from a deleted Entra user to a new one: the row says whose account it was and
    what the hand-over changes on it (externalId, names, title), old -> new."""
    from tests.test_brownfield import entra_by_upn

    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    upn = sorted(expected_upns(tenant))[3]
    first = entra_by_upn(tenant)[upn]
    tenant.delete_user(first)
    second = tenant.add_user(userPrincipalName=upn, givenName="New", surname="Hire", displayName="New Hire",
                             jobTitle="Analyst")
    tenant.add_member(group_id(tenant, "Pilot"), second)
    status, preview = sync(sandbox.settings(state_url), dry_run=True)
    assert status == 0, preview
    row = next(row for row in preview.plan_changes if row["object"] == "user" and row["name"] == upn)
    detail = row["detail"]
    assert f"account of Entra user {first}" in detail, row
    assert f'externalId: "{first}" -> "{second}"' in detail and '-> "New Hire"' in detail and '-> "Analyst"' in detail, row
