"""What Prefect keeps of a run: typed JSON (never pickle), private files, no secret, deleted after the retry window."""

from __future__ import annotations

import json
import os
import pickle
import stat
import time

import pytest

from guardsync.changes import MemberChange, Plan, UserChange
from guardsync.models import AppliedState, AppliedUser
from guardsync.models import DesiredUser
from tasks.results import SERIALIZER, UnknownResultType


@pytest.fixture
def result_storage(tmp_path, prefect_server):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    folder = tmp_path / "results"
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(folder)}):
        yield folder


def test_a_run_persists_typed_json_in_private_files_without_secrets(sandbox, state_url, result_storage):
    from flows.sync_directory import sync_directory

    old = result_storage / "a-result-from-last-month"
    result_storage.mkdir(mode=0o755)
    old.write_text("{}")
    os.utime(old, (time.time() - 30 * 86400,) * 2)
    settings = sandbox.settings(state_url)
    assert settings.sync.results_keep_days == 7  # the default retry window
    assert sync_directory(settings=settings)["status"] == "completed"

    assert not old.exists(), "results older than results_keep_days are deleted"
    assert stat.S_IMODE(result_storage.stat().st_mode) == 0o700
    files = [path for path in result_storage.iterdir() if path.is_file()]
    serializers, tasks_kept = set(), set()
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        record = json.loads(path.read_bytes())
        serializers.add(record["metadata"]["serializer"]["type"])
        payload = SERIALIZER.loads(record["result"].encode())
        text = json.dumps(record) + repr(payload)
        assert sandbox.tenant.client_secret not in text and sandbox.api_key not in text
        tasks_kept.add(type(payload).__name__)
    assert serializers == {"guardsync-json"}  # never pickle
    # extract, observe (a first run reads Atlassian), plan and the three loads; flatten, scope and the gates
    # are recomputed by a retry, never kept
    assert tasks_kept == {"Extracted", "Observation", "Plan", "dict"}, tasks_kept
    assert len(files) == 6
    assert stat.S_IMODE(os.stat(state_url.removeprefix("sqlite:///")).st_mode) == 0o600


def test_stage_results_round_trip():
    user = DesiredUser("e1", "ada@contoso.com", "Ada", "Ada", "L", "", True)
    plan = Plan(users=[UserChange("update", user)], members=[MemberChange("g1", ("e1",), ())], not_created_disabled=2)
    applied = AppliedState(users={"e1": AppliedUser("s1", user)}, members={"g1": frozenset({"e1", "e2"})})
    for value in (plan, applied, {"counts": {"users_updated": 1}, "failures": ["x"]}, (applied, plan)):
        assert SERIALIZER.loads(SERIALIZER.dumps(value)) == value


def test_a_result_naming_another_type_or_a_pickle_is_refused():
    forged = {"__type__": "Popen", "fields": {"args": ["touch", "/tmp/pwned"]}}
    with pytest.raises(UnknownResultType, match="'Popen', which is not a guardsync stage result"):
        SERIALIZER.loads(json.dumps(forged).encode())
    with pytest.raises(Exception):
        SERIALIZER.loads(pickle.dumps(os.system))
