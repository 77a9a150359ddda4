"""End to end, as in production: Prefect server on PostgreSQL, two process workers, prefect.yaml.

Two sandbox directories (two tenants, two SCIM servers, one API host as on api.atlassian.com)
are deployed from the repository's prefect.yaml (a copy pointed at the sandboxes), their
secrets and state URLs kept in Prefect Secret blocks. Four runs go at once: contoso, fabrikam,
contoso again, and a fabrikam run that a gate blocks. The test checks that the runs end as they
should, that one directory never runs twice at once while the two directories run in parallel,
that the loads of all runs together stay under the SCIM API's global concurrency limit, the
artifacts, that both Atlassian sides hold exactly the users and groups in scope, and that the
README's automation tells the admins (a webhook on loopback) about the blocked run. Then a run
that fails in its last load is retried as the UI's Retry button does: it must resume there. Last,
a run that failed is retried after a later run completed: it must stop, and leave the leaver
that later run deactivated as it is.

It prints the timeline of the runs. Everything is stopped and the databases dropped in the end.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import datetime, timezone

import pytest
import yaml

from guardsync.sandbox.http import Fault
from guardsync.sandbox.stack import Sandbox, to_toml
from guardsync.state import StateStore
from guardsync.sandbox.tenant import generate_tenant
from tasks.load import scim_limit_name
from tests.production.stack import (
    PREFECT,
    REPO,
    Processes,
    WebhookReceiver,
    clean_environment,
    create_database,
    drop_database,
    flow_run_id_from,
    free_port,
    prefect_cli,
    read_events,
    render_prefect_yaml,
    secret_name,
    wait_healthy,
)
from tests.test_flow import expected_upns, group_id, groups_by_name, transitive_users

pytestmark = pytest.mark.slow

DOMAINS = ("contoso.com", "fabrikam.com")
SEEDS = {"contoso": 11, "fabrikam": 29}  # deployment name in prefect.yaml -> sandbox tenant
SCIM_SLOTS = 3  # below write_concurrency (4): each load holds all 3 slots, so no two loads overlap
SANDBOX_LATENCY = 0.02  # seconds a request, so loads take long enough to meet each other
USERS = 400  # a tenant
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# The automation of the README ("Run it in production", Alerts); the test fills in its webhook block's id.
AUTOMATION = """
name: guardsync-run-failed
description: Tell the admins when a guardsync run fails, is blocked by a gate or guard, or crashes
enabled: true
trigger:
  type: event
  posture: Reactive
  expect: [prefect.flow-run.Failed, prefect.flow-run.Crashed]
  match:
    prefect.resource.id: prefect.flow-run.*
  match_related:
    prefect.resource.role: flow
    prefect.resource.name: sync-directory
  for_each: [prefect.resource.id]
  threshold: 1
  within: 0
actions:
  - type: send-notification
    block_document_id: BLOCK_DOCUMENT_ID
    subject: "guardsync {{ deployment.name }}: run {{ flow_run.name }} {{ flow_run.state.name }}"
    body: |
      sync-directory/{{ deployment.name }}: run {{ flow_run.name }} ({{ flow_run.id }}) ended {{ flow_run.state.name }}.
      {{ flow_run.state.message }}
      {% if 'GuardsyncBlocked' in (flow_run.state.message or '') %}A gate or guard stopped the run before any write: read its gate-results and summary artifacts, fix the cause, then run it again.{% else %}Read the run's logs and summary; once the cause is fixed, Retry the run in the UI: it resumes at the failed load.{% endif %}
"""


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


@pytest.mark.timeout(600)
def test_two_directories_on_two_workers_with_a_postgres_server(tmp_path):
    started = time.monotonic()
    tag = uuid.uuid4().hex[:10]
    databases = {"prefect": f"guardsync_e2e_{tag}_prefect",
                 **{name: f"guardsync_e2e_{tag}_{name}_state" for name in SEEDS}}
    (logs := tmp_path / "logs").mkdir()
    processes = Processes(logs)
    sandboxes: dict[str, Sandbox] = {}
    passed = False
    try:
        for database in databases.values():
            create_database(database)
        for name, seed in SEEDS.items():
            tenant = generate_tenant(users=USERS, groups=10, seed=seed, domains=DOMAINS)
            sandboxes[name] = Sandbox(tenant, atlassian_domains=set(DOMAINS), latency=SANDBOX_LATENCY).start()
        ca_bundle = tmp_path / "sandbox-cas.pem"  # each sandbox made its own CA; the flow runs trust both
        ca_bundle.write_text("".join(sb.ca.ca_file.read_text() for sb in sandboxes.values()))
        limit_names = {scim_limit_name(sb.scim.scim_url) for sb in sandboxes.values()}
        assert len(limit_names) == 1, "both directories are on one SCIM API host, as on api.atlassian.com"
        scim_limit = limit_names.pop()

        # -- the server, on PostgreSQL ------------------------------------------------------
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        server = processes.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                 clean_environment(
                                     PREFECT_HOME=str(tmp_path / "server-home"),
                                     PREFECT_API_DATABASE_CONNECTION_URL=(
                                         f"postgresql+asyncpg://postgres@127.0.0.1:5432/{databases['prefect']}"),
                                     PREFECT_API_URL=api,
                                     PREFECT_UI_ENABLED="false",
                                     # a run waiting for its directory's slot looks again after 2 s (default 30)
                                     PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2",
                                 ))
        health_seconds = wait_healthy(api, server)
        cli_env = clean_environment(PREFECT_HOME=str(tmp_path / "cli-home"), PREFECT_API_URL=api)

        # -- deployments from prefect.yaml, secrets in blocks, the SCIM API's limit -----------
        rendered = render_prefect_yaml(REPO / "prefect.yaml", {n: sb.config(state="unused") for n, sb in sandboxes.items()})
        pools = {d["work_pool"]["name"] for d in rendered["deployments"]}
        assert len(pools) == 1
        pool = pools.pop()
        (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(rendered, sort_keys=False))
        prefect_cli("work-pool", "create", pool, "--type", "process", env=cli_env)
        prefect_cli("gcl", "create", scim_limit, "--limit", str(SCIM_SLOTS), env=cli_env)
        prefect_cli("deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"), env=cli_env)

        with WebhookReceiver() as webhook, _prefect_api(api):
            from prefect import get_client
            from prefect.blocks.notifications import CustomWebhookNotificationBlock
            from prefect.blocks.system import Secret

            for deployment in rendered["deployments"]:
                settings, sandbox = deployment["parameters"]["settings"], sandboxes[deployment["name"]]
                state_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{databases[deployment['name']]}"
                for reference, value in ((settings["entra"]["client_secret"], sandbox.tenant.client_secret),
                                         (settings["atlassian"]["api_key"], sandbox.api_key),
                                         (settings["sync"]["state"], state_url)):
                    Secret(value=value).save(secret_name(reference), overwrite=True)
            block_id = CustomWebhookNotificationBlock(
                name="guardsync-admins", url=webhook.url, json_data={"text": "{{subject}}\n{{body}}"},
            ).save("guardsync-admins", overwrite=True)
            assert AUTOMATION.strip() in (REPO / "README.md").read_text(), "the README's automation is the tested one"
            (tmp_path / "automation.yaml").write_text(AUTOMATION.replace("BLOCK_DOCUMENT_ID", str(block_id)))
            prefect_cli("automation", "create", "--from-file", str(tmp_path / "automation.yaml"), env=cli_env)

            with get_client(sync_client=True) as client:
                deployments = {d["name"]: client.read_deployment_by_name(f"sync-directory/{d['name']}")
                               for d in rendered["deployments"]}
            for deployment in deployments.values():  # as prefect.yaml says, for each directory
                # every interval prefect.yaml gives (the render paused them: tests/test_cadence.py checks which is on)
                assert sorted((s.schedule.interval.total_seconds(), s.active) for s in deployment.schedules) == [
                    (60, False), (3600, False), (7200, False), (14400, False), (86400, False)]
                assert deployment.global_concurrency_limit.limit == 1
                assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
                assert deployment.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $GUARDSYNC_HOME }}"}}]

            # -- two workers; the flow runs they start reach the sandboxes over loopback -------------
            for number in (1, 2):
                processes.start(f"worker-{number}", [PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                                     "--name", f"worker-{number}"],
                                clean_environment(
                                    PREFECT_HOME=str(tmp_path / f"worker-{number}-home"),
                                    PREFECT_API_URL=api,
                                    GUARDSYNC_HOME=str(REPO),  # the pull step's working directory
                                    REQUESTS_CA_BUNDLE=str(ca_bundle),
                                    PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),  # shared: retries find results
                                    PREFECT_WORKER_QUERY_SECONDS="1",
                                ))

            # -- four runs at once ----------------------------------------------------------------
            t0 = datetime.now(timezone.utc)
            runs: dict[str, str] = {}  # label -> flow run id
            cli_runs = {label: processes_run(label, cli_env) for label in ("contoso-1", "fabrikam-1")}
            for label, output in cli_runs.items():
                runs[label] = flow_run_id_from(output())
            blocked_parameters = json.loads(json.dumps(deployments["fabrikam"].parameters))
            blocked_parameters["settings"]["sync"]["max_group_size"] = 1  # every group is too large: a gate blocks
            with get_client(sync_client=True) as client:
                runs["contoso-2"] = str(client.create_flow_run_from_deployment(
                    deployments["contoso"].id, name="contoso-2").id)
                runs["fabrikam-blocked"] = str(client.create_flow_run_from_deployment(
                    deployments["fabrikam"].id, parameters=blocked_parameters, name="fabrikam-blocked").id)
            triggered_seconds = time.monotonic() - started

            flow_runs = _wait_for_final(runs, timeout=170)
            finished_seconds = time.monotonic() - started

            with get_client(sync_client=True) as client:
                histories = {label: [s.name for s in sorted(client.read_flow_run_states(uuid.UUID(run_id)),
                                                            key=lambda s: s.timestamp)]
                             for label, run_id in runs.items()}
                artifacts = {label: _artifact_keys(client, run_id) for label, run_id in runs.items()}
                limit_after = client.read_global_concurrency_limit_by_name(scim_limit)
            workers = _workers_by_run(api, _iso(t0))
            _print_timeline(t0, runs, flow_runs, histories, workers)

            # -- how the runs ended ------------------------------------------------------------------
            states = {label: flow_runs[label].state for label in runs}
            for label in ("contoso-1", "contoso-2", "fabrikam-1"):
                assert states[label].type.value == "COMPLETED", (label, states[label].message)
            assert states["fabrikam-blocked"].type.value == "FAILED"
            assert "GuardsyncBlocked" in states["fabrikam-blocked"].message
            assert "group_too_large" in states["fabrikam-blocked"].message

            # -- one run per directory at a time; the directories in parallel ------------------------
            for directory in SEEDS:
                mine = sorted((flow_runs[label] for label in runs if label.startswith(directory)),
                              key=lambda run: run.start_time)
                for before, after in zip(mine, mine[1:]):
                    assert before.end_time <= after.start_time, f"two {directory} runs overlapped"
            assert any("AwaitingConcurrencySlot" in history for history in histories.values()), \
                "a second run of a directory should have waited for the first (ENQUEUE)"
            # Whether the two directories' first runs overlap depends on when each worker polls (a
            # fast run can end before the other worker picks its run up): shown, not asserted.
            contoso, fabrikam = flow_runs["contoso-1"], flow_runs["fabrikam-1"]
            overlap = contoso.start_time < fabrikam.end_time and fabrikam.start_time < contoso.end_time
            print(f"contoso-1 and fabrikam-1 {'overlapped' if overlap else 'did not overlap this time'}")

            # -- the SCIM API's global concurrency limit: held by every load, never exceeded ---------
            assert limit_after.active_slots == 0, "slots leaked"
            holds = _slot_holds(api, _iso(t0), limit_after.id, expected_at_least=6)
            assert all(slots == SCIM_SLOTS for _, _, slots, *_ in holds)
            _print_holds(t0, holds, {run_id: label for label, run_id in runs.items()}, scim_limit)
            assert _most_slots_at_once(holds) <= SCIM_SLOTS

            # -- artifacts ----------------------------------------------------------------------------
            writers = [label for label in ("contoso-1", "contoso-2") if "plan-changes" in artifacts[label]]
            assert len(writers) == 1, "only the first contoso run has changes to make; the second finds none"
            for label in runs:  # a blocked run stops at its gate: no plan
                expected = {"summary", "gate-results"} | ({"plan"} if label != "fabrikam-blocked" else set())
                if label.startswith("contoso") and label not in writers:
                    expected = set()  # nothing changed since a completed run: it stops after the read, quietly
                    assert artifacts[label] == set(), (label, artifacts[label])
                assert expected <= artifacts[label], (label, artifacts[label])
            for label in (writers[0], "fabrikam-1"):
                assert {"plan-changes", "load-users", "load-groups", "load-memberships"} <= artifacts[label]

            # -- what Atlassian holds ----------------------------------------------------------------
            for sandbox in sandboxes.values():
                _assert_directory_in_sync(sandbox)

            # -- the admins heard about the blocked run, and only about it ---------------------------
            blocked_message = _wait_for_messages(webhook, 1)[0]
            assert "fabrikam" in blocked_message and "fabrikam-blocked" in blocked_message and "Failed" in blocked_message
            assert "GuardsyncBlocked" in blocked_message and "group_too_large" in blocked_message
            assert "stopped the run before any write" in blocked_message

            # -- a run that fails in its last load, retried as the UI's Retry button does --------------
            fabrikam = sandboxes["fabrikam"]
            pilot = group_id(fabrikam.tenant, "Pilot")
            upn_of = {uid: user["userPrincipalName"] for uid, user in fabrikam.tenant.users.items()}
            newcomer = next(uid for uid in sorted(fabrikam.tenant.users) if upn_of[uid] in expected_upns(fabrikam.tenant)
                            and uid not in transitive_users(fabrikam.tenant, pilot))
            fabrikam.tenant.add_member(pilot, newcomer)  # one membership to add: only load-memberships writes
            fabrikam.scim.inject(_refused("PATCH", r"/Groups/"))
            failed = _run_deployment(deployments["fabrikam"], "fabrikam-retried", runs)
            assert failed.state.type.value == "FAILED" and "AuthError" in failed.state.message, failed.state.message
            graph_reads = _graph_reads(fabrikam)
            retried = _retry_from_the_ui(runs["fabrikam-retried"])
            with get_client(sync_client=True) as client:
                history = [s.name for s in sorted(client.read_flow_run_states(retried.id), key=lambda s: s.timestamp)]
                task_states = _task_states(client, retried.id)
            print(f"fabrikam-retried: {' > '.join(_squeeze(history))}")
            print("  its task runs: " + ", ".join(f"{name} {' then '.join(states)}" for name, states in task_states.items()))
            assert retried.state.type.value == "COMPLETED", retried.state.message
            assert _graph_reads(fabrikam) == graph_reads, "the retry read Entra again instead of using the stored extract"
            assert task_states["extract"][-1] == "Cached" and task_states["load-users"][-1] == "Cached"
            assert task_states["load-memberships"][-1] == "Completed"
            assert upn_of[newcomer] in groups_by_name(fabrikam)["Pilot"]
            _assert_directory_in_sync(fabrikam)

            failed_message = _wait_for_messages(webhook, 2)[1]  # the failure, not the successful retry
            assert "fabrikam-retried" in failed_message and "AuthError" in failed_message and "Retry the run" in failed_message
            for text in (blocked_message, failed_message):
                assert all(sb.api_key not in text and sb.tenant.client_secret not in text for sb in sandboxes.values())

            # -- a retry after a later completed run: its kept extract and plan must not be applied ---------
            # Run A plans an update of X (a new title: PUT with active true) and fails in load-users. X then
            # leaves (disabled in Entra) and run B completes: X is deactivated. The operator presses Retry on A.
            leaver = next(uid for uid in sorted(fabrikam.tenant.users) if upn_of[uid] in expected_upns(fabrikam.tenant))
            fabrikam.tenant.update_user(leaver, jobTitle="Head of Leaving")
            fabrikam.scim.inject(_refused("PUT", r"/Users/"))
            stale = _run_deployment(deployments["fabrikam"], "fabrikam-stale", runs)
            assert stale.state.type.value == "FAILED" and "AuthError" in stale.state.message, stale.state.message
            assert _scim_user(fabrikam, upn_of[leaver])["active"] is True
            fabrikam.tenant.update_user(leaver, accountEnabled=False)
            later = _run_deployment(deployments["fabrikam"], "fabrikam-later", runs)
            assert later.state.type.value == "COMPLETED", later.state.message
            assert _scim_user(fabrikam, upn_of[leaver])["active"] is False
            writes_before = _scim_writes(fabrikam)
            retried_stale = _retry_from_the_ui(runs["fabrikam-stale"])
            print(f"fabrikam-stale retried: {retried_stale.state_name}: {retried_stale.state.message}")
            assert retried_stale.state.type.value == "FAILED", retried_stale.state.message
            assert "StaleRetry" in retried_stale.state.message and runs["fabrikam-later"] in retried_stale.state.message
            assert "ran again since it started" in retried_stale.state.message
            assert "start a new run instead of retrying" in retried_stale.state.message
            assert _scim_user(fabrikam, upn_of[leaver])["active"] is False, "the retry reactivated the leaver"
            assert _scim_writes(fabrikam) == writes_before, "the stale retry wrote to Atlassian"
            _assert_directory_in_sync(fabrikam)

            # -- approval: a guard holds a deployment run's plan until a person answers in the UI ------------
            contoso = sandboxes["contoso"]
            contoso_state = f"postgresql+psycopg://postgres@127.0.0.1:5432/{databases['contoso']}"
            held_parameters = json.loads(json.dumps(deployments["contoso"].parameters))
            held_parameters["settings"]["sync"]["max_deactivations"] = 2
            _disable(contoso, 3)
            approved = _start_deployment(deployments["contoso"], "contoso-approved", runs, held_parameters)
            paused = _wait_for_pause(approved)
            with get_client(sync_client=True) as client:
                shown = _artifact_keys(client, approved)
                digest = _form_default(client, paused, "plan_digest")
            assert {"plan", "plan-changes", "gate-results"} <= shown, shown  # the plan is published before it waits
            held = StateStore(contoso_state).held_plan(approved)
            assert held["status"] == "waiting" and held["digest"] == digest
            writes_before = _scim_writes(contoso)
            _answer(approved, decision="approve", reason="the three planned leavers", approver="Ada", plan_digest=digest)
            done = _wait_for_final({"approved": approved}, timeout=120)["approved"]
            assert done.state.type.value == "COMPLETED", done.state.message
            held = StateStore(contoso_state).held_plan(approved)
            assert (held["status"], held["decided_by"], held["applied_by"]) == ("applied", "Ada", approved)
            assert held["counts"]["users_deactivated"] == 3
            made = next(run["counts"] for run in StateStore(contoso_state).history() if run["run_id"] == approved)
            assert {k: v for k, v in made.items() if v} == {k: v for k, v in held["counts"].items() if v}, \
                "the approved run made other changes than the plan it showed"
            _assert_directory_in_sync(contoso)

            _disable(contoso, 3)
            rejected = _start_deployment(deployments["contoso"], "contoso-rejected", runs, held_parameters)
            paused = _wait_for_pause(rejected)
            with get_client(sync_client=True) as client:
                digest = _form_default(client, paused, "plan_digest")
            writes_before = _scim_writes(contoso)
            _answer(rejected, decision="reject", reason="not expected: check the HR feed", approver="Grace",
                    plan_digest=digest)
            done = _wait_for_final({"rejected": rejected}, timeout=120)["rejected"]
            assert done.state.type.value == "FAILED" and "rejected by Grace" in done.state.message, done.state.message
            assert _scim_writes(contoso) == writes_before

            held_parameters["settings"]["sync"]["approval_timeout_hours"] = 4 / 3600  # nobody answers within 4 s
            expired = _start_deployment(deployments["contoso"], "contoso-expired", runs, held_parameters)
            done = _wait_for_final({"expired": expired}, timeout=120)["expired"]
            assert done.state.type.value == "FAILED" and "nobody answered" in done.state.message, done.state.message
            assert _scim_writes(contoso) == writes_before
            assert StateStore(contoso_state).held_plan(expired)["status"] == "expired"

            # ... and the admin applies that plan from the terminal
            config = tmp_path / "contoso.toml"
            config.write_text(to_toml(contoso.config(state=contoso_state, max_deactivations=2)))
            approve = subprocess.run([str(REPO / ".venv" / "bin" / "guardsync"), "approve", "--config", str(config),
                                      expired, "--reason", "confirmed with HR"], env=cli_env | contoso.environment()
                                     | {"REQUESTS_CA_BUNDLE": str(ca_bundle)}, capture_output=True, text=True, timeout=300)
            assert approve.returncode == 0, approve.stdout + approve.stderr
            held = StateStore(contoso_state).held_plan(expired)
            assert held["status"] == "applied" and held["reason"] == "confirmed with HR"
            _assert_directory_in_sync(contoso)

        print(f"\nserver healthy after {health_seconds:.1f}s; runs triggered at {triggered_seconds:.1f}s, "
              f"all final at {finished_seconds:.1f}s; {len(holds)} SCIM slot holds of {SCIM_SLOTS} on {scim_limit}, "
              f"at most {_most_slots_at_once(holds)} slots at once")
        for text in (blocked_message, failed_message):
            print("notification received by the webhook:\n  " + "\n  ".join(text.splitlines()))
        passed = True
    finally:
        processes.stop_all()
        for sandbox in sandboxes.values():
            sandbox.stop()
        for database in databases.values():
            drop_database(database)
        if not passed:
            print(processes.tail())
        print(f"test wall time {time.monotonic() - started:.1f}s")


# -- helpers -------------------------------------------------------------------------------------


def processes_run(label: str, env: dict[str, str]):
    """`prefect deployment run` in the background; returns a function giving its output."""
    directory = label.split("-")[0]
    process = subprocess.Popen([PREFECT, "--no-prompt", "deployment", "run", f"sync-directory/{directory}",
                                "--flow-run-name", label], env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)

    def output() -> str:
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, out
        return out

    return output


class _prefect_api:
    """Point this process's Prefect client at the test server."""

    def __init__(self, api: str):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._context = temporary_settings(updates={PREFECT_API_URL: api})

    def __enter__(self):
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _wait_for_messages(webhook: WebhookReceiver, count: int, timeout: float = 30) -> list[str]:
    """The texts the automation sent, once there are `count`; then a pause to catch any extra one."""
    deadline = time.monotonic() + timeout
    while len(webhook.received) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    texts = [json.loads(message["body"])["text"] for message in webhook.received]
    assert len(texts) == count, texts
    return texts


def _refused(method: str, path: str) -> Fault:
    """Atlassian refuses the key once (401): the load fails for good, a retry is the operator's call."""
    return Fault(method, path, status=401, times=1,
                 body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}')


def _run_deployment(deployment, name: str, runs: dict[str, str]):
    """One run of the deployment, named `name` (recorded in runs), waited for to its end."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs[name] = str(client.create_flow_run_from_deployment(deployment.id, name=name).id)
    return _wait_for_final({name: runs[name]}, timeout=90)[name]


def _retry_from_the_ui(run_id: str):
    """What the UI's Retry button sends; the run waited for to its new end."""
    from prefect import get_client
    from prefect.states import State, StateType

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(run_id), force=True, state=State(
            type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"))
    return _wait_for_final({"retried": run_id}, timeout=90)["retried"]


def _disable(sandbox: Sandbox, count: int) -> None:
    """Disable `count` users in Entra that Atlassian holds active: leavers."""
    active = {user["userName"] for user in sandbox.scim.users() if user["active"]}
    leavers = [uid for uid, user in sorted(sandbox.tenant.users.items())
               if user["userPrincipalName"] in active and user.get("accountEnabled", True)][:count]
    for uid in leavers:
        sandbox.tenant.update_user(uid, accountEnabled=False)


def _start_deployment(deployment, name: str, runs: dict[str, str], parameters: dict) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs[name] = str(client.create_flow_run_from_deployment(deployment.id, name=name, parameters=parameters).id)
    return runs[name]


def _wait_for_pause(run_id: str, timeout: float = 120):
    """The flow run once it is paused waiting for input (the UI's Resume form)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(uuid.UUID(run_id))
            if run.state.type.value == "PAUSED" and run.state.state_details.run_input_keyset:
                return run
            assert run.state.type.value not in FINAL, (run.state_name, run.state.message)
            time.sleep(1)
    raise AssertionError(f"run {run_id} never paused")


def _form_default(client, flow_run, field: str):
    """A field's default in the form the UI shows (the run saved its schema with the plan's digest)."""
    schema = json.loads(client.read_flow_run_input(flow_run.id, flow_run.state.state_details.run_input_keyset["schema"]))
    return schema["properties"][field]["default"]


def _answer(run_id: str, **form) -> None:
    """What the UI's Resume button sends with the form filled in."""
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(uuid.UUID(run_id), run_input=form)


def _scim_user(sandbox: Sandbox, user_name: str) -> dict:
    return next(user for user in sandbox.scim.users() if user["userName"] == user_name)


def _scim_writes(sandbox: Sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in ("POST", "PUT", "PATCH", "DELETE"))


def _graph_reads(sandbox: Sandbox) -> int:
    """Graph API requests served (token and discovery requests aside)."""
    return sum(n for endpoint, n in sandbox.graph.requests.items() if "/v1.0/" in endpoint)


def _task_states(client, flow_run_id) -> dict[str, list[str]]:
    """Task name -> the final state name of each of its task runs in the flow run, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for task_run in sorted(found, key=lambda t: t.expected_start_time or t.created):
        states.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run.state_name)  # "extract-3a1" -> extract
    return states


def _wait_for_final(runs: dict[str, str], timeout: float) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[uuid.UUID(run_id) for run_id in runs.values()])))
            by_id = {str(run.id): run for run in found}
            if all(run_id in by_id and by_id[run_id].state_type.value in FINAL for run_id in runs.values()):
                return {label: by_id[run_id] for label, run_id in runs.items()}
            if time.monotonic() > deadline:
                raise AssertionError("runs not final in time: " + ", ".join(
                    f"{label}={by_id[run_id].state_name if run_id in by_id else '?'}" for label, run_id in runs.items()))
            time.sleep(1)


def _artifact_keys(client, run_id: str) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run_id)])))
    return {artifact.key for artifact in found if artifact.key}


def _workers_by_run(api: str, since: str) -> dict[str, str]:
    """flow run id -> the worker that started it (the workers' submitted-flow-run events)."""
    workers = {}
    for event in read_events(api, "prefect.worker.submitted-flow-run", since):
        for related in event.get("related", []):
            if related.get("prefect.resource.role") == "flow-run":
                workers[related["prefect.resource.id"].removeprefix("prefect.flow-run.")] = \
                    event["resource"].get("prefect.resource.name", "?")
    return workers


def _slot_holds(api: str, since: str, limit_id, expected_at_least: int) -> list[tuple]:
    """(acquired, released, slots, flow run id, task run name) of every hold on the limit, from its events (they reach the store in batches)."""
    deadline = time.monotonic() + 30
    while True:
        events = read_events(api, "prefect.concurrency-limit.", since, resource_id=f"prefect.concurrency-limit.{limit_id}")
        acquired = {e["id"]: e for e in events if e["event"] == "prefect.concurrency-limit.acquired"}
        released = {e["follows"]: e for e in events if e["event"] == "prefect.concurrency-limit.released"}
        if (len(acquired) >= expected_at_least and set(released) >= set(acquired)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(acquired) >= expected_at_least, f"{len(acquired)} slot acquisitions recorded, expected {expected_at_least}+"
    assert set(released) >= set(acquired), "an acquisition without its release"
    return [(datetime.fromisoformat(e["occurred"]), datetime.fromisoformat(released[i]["occurred"]),
             int(e["resource"]["slots-acquired"]), _related(e, "flow-run"), _related(e, "task-run"))
            for i, e in acquired.items()]


def _related(event: dict, role: str) -> str:
    """The id of the event's related resource in `role` (flow-run, task-run)."""
    for related in event.get("related", []):
        if related.get("prefect.resource.role") == role:
            return related["prefect.resource.id"].removeprefix(f"prefect.{role}.")
    return "?"


def _most_slots_at_once(holds, tolerance: float = 0.25) -> int:
    """The most slots held at one moment. A release is recorded just after it happens, so a hold
    that starts within `tolerance` seconds of another's recorded end is not counted as overlapping."""
    points = sorted([(start.timestamp(), slots) for start, _, slots, *_ in holds]
                    + [(end.timestamp() - tolerance, -slots) for _, end, slots, *_ in holds])
    held = most = 0
    for _, change in points:
        held += change
        most = max(most, held)
    return most


def _assert_directory_in_sync(sandbox: Sandbox) -> None:
    tenant = sandbox.tenant
    in_scope = expected_upns(tenant)
    assert {user["userName"] for user in sandbox.scim.users() if user["active"]} == in_scope  # leavers: deactivated
    atlassian = groups_by_name(sandbox)
    assert set(atlassian) == {g["displayName"] for g in tenant.groups.values()}
    for gid, group in tenant.groups.items():
        want = {tenant.users[u]["userPrincipalName"] for u in transitive_users(tenant, gid)} & in_scope
        assert atlassian[group["displayName"]] == want, group["displayName"]


def _print_timeline(t0: datetime, runs, flow_runs, histories, workers) -> None:
    print(f"\nTimeline of the runs (seconds after the first trigger, {t0:%Y-%m-%d %H:%M:%S} UTC):")
    print(f"  {'run':<17} {'deployment':<24} {'worker':<9} {'start':>6} {'end':>6} {'secs':>5}  {'final':<10} states")
    rows = sorted(runs, key=lambda label: flow_runs[label].start_time or flow_runs[label].end_time or t0)
    for label in rows:
        run = flow_runs[label]
        start = (run.start_time - t0).total_seconds() if run.start_time else float("nan")
        end = (run.end_time - t0).total_seconds() if run.end_time else float("nan")
        path = " > ".join(_squeeze(histories[label]))
        deployment = f"sync-directory/{label.split('-')[0]}"
        print(f"  {label:<17} {deployment:<24} {workers.get(runs[label], '?'):<9} "
              f"{start:6.1f} {end:6.1f} {end - start:5.1f}  {run.state_name:<10} {path}")


def _print_holds(t0: datetime, holds, labels: dict[str, str], name: str) -> None:
    """Each load's hold of the SCIM API's slots, and how long it waited for them after it started."""
    from prefect import get_client

    print(f"Slots of the global concurrency limit {name} (limit {SCIM_SLOTS}), held by the loads:")
    with get_client(sync_client=True) as client:
        for start, end, slots, flow_run, task_run_id in sorted(holds):
            task_run = client.read_task_run(uuid.UUID(task_run_id))
            waited = (start - task_run.start_time).total_seconds()
            print(f"  {labels.get(flow_run, flow_run):<17} {task_run.name:<22} {slots} slots "
                  f"{(start - t0).total_seconds():6.2f} -> {(end - t0).total_seconds():6.2f}  "
                  f"(task started {waited:4.2f}s before it got them)")


def _squeeze(names: list[str]) -> list[str]:
    """Scheduled > AwaitingConcurrencySlot > AwaitingConcurrencySlot > ... collapsed to 'AwaitingConcurrencySlot x3'."""
    out: list[list] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [f"{name} x{count}" if count > 1 else name for name, count in out]
