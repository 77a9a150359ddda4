"""The fast cadence: a run that finds no change in Entra is quiet in Prefect, and the retention of quiet
runs deletes those runs and nothing else (README, "The fast cadence")."""

import time
import uuid
from pathlib import Path

import yaml

from tests.conftest import task_name, task_run_events

REPO = Path(__file__).resolve().parent.parent


def task_run_names(flow_run_id: str) -> list[str]:
    return task_runs_recorded(flow_run_id, set(), wait_seconds=0)


def task_runs_recorded(flow_run_id: str, at_least: set[str], wait_seconds: float = 60) -> list[str]:
    """The task runs of a flow run, by task name ("extract-3a1" -> "extract"), from their events (the server
    records task runs from them): they arrive a moment after the run, so wait for the named ones."""
    events = task_run_events(flow_run_id, at_least, wait_seconds)
    return sorted({event["resource"]["prefect.resource.id"]: task_name(event) for event in events}.values())


def flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(str(flow_run_id)))


def every_flow_run() -> list:
    from prefect import get_client

    runs, offset = [], 0
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(limit=200, offset=offset):
            runs += page
            offset += len(page)
    return runs


def test_a_no_change_run_makes_no_task_run_and_no_artifact_and_is_tagged_quiet(make_sandbox, state_url, sync):
    from flows.prune_quiet_runs import QUIET_TAG
    from tests.test_operator_output import artifacts_of

    sandbox = make_sandbox(users=150, groups=10)
    settings = sandbox.settings(state_url)
    first = sync(settings)[1]
    sandbox.graph.reset_counts()
    status, quiet = sync(settings)
    assert status == 0 and quiet.message.startswith("no change in Entra"), quiet
    quiet_graph = dict(sandbox.graph.requests)
    leaver = next(uid for uid, u in sandbox.tenant.users.items()
                  if u["accountEnabled"] and u["userPrincipalName"] in {x["userName"] for x in sandbox.scim.users()})
    sandbox.tenant.update_user(leaver, accountEnabled=False)
    sandbox.graph.reset_counts()
    status, changed = sync(settings)
    assert status == 0 and changed.counts["users_deactivated"] == 1, changed
    # The quick look's delta round is the extract's: a change costs no second read.
    assert sandbox.graph.requests["GET /v1.0/users/delta"] == 1 and sandbox.graph.requests["GET /v1.0/groups/delta"] == 1

    # The run after the quiet one had its task runs recorded: the server has caught up with the quiet one too.
    stages = {"extract", "flatten", "scope", "validate", "plan", "load-users"}
    assert stages <= set(task_runs_recorded(changed.run_id, stages)), task_run_names(changed.run_id)
    assert task_run_names(quiet.run_id) == []  # the named ones: none
    assert artifacts_of(quiet.run_id) == {}
    assert "summary" in artifacts_of(changed.run_id) and "summary" in artifacts_of(first.run_id)
    assert quiet_graph.get("GET /v1.0/users/delta") == 1 and quiet_graph.get("GET /v1.0/groups/delta") == 1
    assert QUIET_TAG in flow_run(quiet.run_id).tags
    assert flow_run(quiet.run_id).state.is_completed()
    for busy in (first, changed):
        assert QUIET_TAG not in flow_run(busy.run_id).tags


def test_the_retention_deletes_old_quiet_runs_and_nothing_else(make_sandbox, state_url, sync):
    from prefect import flow, tags

    from flows.prune_quiet_runs import QUIET_TAG, SYNC_FLOW, prune_quiet_runs

    sandbox = make_sandbox(users=60, groups=5)
    settings = sandbox.settings(state_url)
    busy = sync(settings)[1]
    quiet = sync(settings)[1]
    assert quiet.message.startswith("no change in Entra"), quiet

    @flow(name=SYNC_FLOW)
    def failed_while_tagged_quiet():
        raise RuntimeError("a run that failed is never pruned, whatever its tags")

    @flow(name="another-flow")
    def someone_elses():
        return 1

    with tags(QUIET_TAG):
        failed = failed_while_tagged_quiet(return_state=True)
        other = someone_elses(return_state=True)
    assert failed.is_failed() and other.is_completed()
    keep = {str(busy.run_id), str(failed.state_details.flow_run_id), str(other.state_details.flow_run_id)}

    def is_prunable(run) -> bool:  # the rule, said independently of the flow's filter
        return QUIET_TAG in run.tags and run.state_type.value == "COMPLETED" and run.flow_id == flow_run(quiet.run_id).flow_id

    before = every_flow_run()
    prunable = {str(run.id) for run in before if is_prunable(run)}
    assert str(quiet.run_id) in prunable and not keep & prunable

    assert prune_quiet_runs(keep_hours=24) == 0  # they all ended moments ago: kept a day
    assert {str(run.id) for run in before} <= {str(run.id) for run in every_flow_run()}

    assert prune_quiet_runs(keep_hours=1e-6) == len(prunable)
    after = {str(run.id) for run in every_flow_run()}
    assert not prunable & after, "a quiet run older than keep_hours is left"
    assert keep <= after, "a run that is not a completed quiet sync-directory run was deleted"
    assert {str(run.id) for run in before} - prunable <= after, "only the quiet runs went"


def test_prefect_yaml_ships_the_fast_cadence_for_every_directory_and_the_retention():
    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    directories = [d for d in data["deployments"] if d["entrypoint"] == "flows/sync_directory.py:sync_directory"]
    assert directories
    for deployment in directories:
        active = [s["interval"] for s in deployment["schedules"] if s["active"]]
        assert active == [60], (deployment["name"], active)  # the fast cadence, alone
        assert {s["interval"] for s in deployment["schedules"]} == {60, 3600, 7200, 14400, 86400}
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert "full_read_every_hours" not in deployment["parameters"]["settings"]["sync"]  # daily (the default)
    [retention] = [d for d in data["deployments"] if d["entrypoint"] == "flows/prune_quiet_runs.py:prune_quiet_runs"]
    assert [s["interval"] for s in retention["schedules"] if s["active"]] == [3600]
    assert retention["parameters"]["keep_hours"] == 24


def test_a_quiet_run_reads_the_mirror_without_its_snapshot_also_from_a_store_saved_before_columns_were_kept(tmp_path):
    import json

    import pandas as pd
    from sqlalchemy import update

    from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, Snapshot
    from guardsync.state import StateStore, mirror

    users = pd.DataFrame([["u1", "ada@contoso.com", "ada@contoso.com", "Ada", "Ada", "L", "CTO", True, "Member"]],
                         columns=USER_COLUMNS)
    snapshot = Snapshot("t1", "Contoso", users, pd.DataFrame(columns=GROUP_COLUMNS), pd.DataFrame(columns=EDGE_COLUMNS),
                        ["contoso.com"], None)
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert store.load_mirror(snapshot=False).user_columns is None  # nothing read yet: a full read follows
        assert store.save_mirror(snapshot, {"users": "link-A"}, True, based_on=0)
        light = store.load_mirror(snapshot=False)
        assert light.snapshot is None and light.user_columns == tuple(USER_COLUMNS) and light.links == {"users": "link-A"}
        assert store.load_snapshot().users["jobTitle"].tolist() == ["CTO"]

        # A mirror an older guardsync saved has no columns in its meta: read whole once, completed by the next save.
        with store.engine.begin() as conn:
            meta = json.loads(conn.execute(mirror.select().where(mirror.c.key == "meta")).one().data)
            del meta["user_columns"]
            conn.execute(update(mirror).where(mirror.c.key == "meta").values(data=json.dumps(meta).encode()))
        old = store.load_mirror(snapshot=False)
        assert old.snapshot is None and old.user_columns == tuple(USER_COLUMNS)
        assert store.save_links({"users": "link-B"}, old.generation, old.user_columns)
        with store.engine.connect() as conn:
            assert json.loads(conn.execute(mirror.select().where(mirror.c.key == "meta")).one().data)["user_columns"]
    finally:
        store.dispose()
