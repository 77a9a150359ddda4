"""Approval of a plan an approvable guard holds (DESIGN.md, "Approval"), in-process.

The pause in the Prefect UI is exercised here against the session's Prefect server, answered over its API as
the UI's Resume form does (the run is told it is a deployment's: the production test runs real deployments);
the terminal's `guardsync approve` runs as the command line does.
"""

from __future__ import annotations

import threading
import time

import pytest

from guardsync.cli import main
from guardsync.errors import GuardsyncBlocked
from guardsync.sandbox.stack import to_toml
from guardsync.state import StateStore
from tests.test_safety import active_users, scim_writes

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def sandbox(make_sandbox):
    """A small tenant: approval is about which plan is applied, not its size."""
    return make_sandbox(users=40)


def disable_some(sandbox, count: int) -> list[str]:
    """Disable `count` synced users in Entra: more than max_deactivations = 2 lets through."""
    synced = {name for name, active in active_users(sandbox).items() if active}
    chosen = [uid for uid, user in sorted(sandbox.tenant.users.items())
              if user["userPrincipalName"] in synced and user.get("accountEnabled", True)][:count]
    for uid in chosen:
        sandbox.tenant.update_user(uid, accountEnabled=False)
    return [sandbox.tenant.users[uid]["userPrincipalName"] for uid in chosen]


@pytest.fixture
def blocked(sandbox, state_url, sync):
    """A directory synced once, then 5 users disabled in Entra, over max_deactivations = 2: (settings, error)."""
    settings = sandbox.settings(state_url, max_deactivations=2)
    assert sync(settings)[0] == 0
    disable_some(sandbox, 5)
    sandbox.scim.reset_counts()
    status, error = sync(settings)
    assert status == 3 and isinstance(error, GuardsyncBlocked) and error.rule == "max_deactivations", error
    assert scim_writes(sandbox) == 0
    return settings, error


def test_a_blocked_run_holds_its_plan_and_approve_applies_exactly_it_once(sandbox, state_url, sync, blocked):
    settings, error = blocked
    held = StateStore(state_url).held_plan(error.held_run)
    assert held["status"] == "held" and held["rules"] == "max_deactivations" and held["counts"]["users_deactivated"] == 5
    assert f"guardsync approve RUN_ID (the run id {error.held_run})" in str(error)
    status, summary = sync(settings, approve_run=error.held_run, approval_reason="leavers of the Q4 reorganisation")
    assert status == 0, summary
    assert summary.counts["users_deactivated"] == 5 and sum(not a for a in active_users(sandbox).values()) == 5
    assert f"the plan of run {error.held_run}" in summary.approval and "Q4 reorganisation" in summary.approval
    store = StateStore(state_url)
    held = store.held_plan(error.held_run)
    assert held["status"] == "applied" and held["applied_by"] == summary.run_id and held["reason"].startswith("leavers")
    operations = [row["operation"] for row in store.audit_of(error.held_run)]
    assert operations == ["hold", "approve", "applied"], operations
    sandbox.scim.reset_counts()
    status, again = sync(settings, approve_run=error.held_run, approval_reason="twice")
    assert status == 1 and "already applied" in str(again) and scim_writes(sandbox) == 0


def test_approve_is_refused_when_entra_changed_since_the_plan(sandbox, sync, blocked):
    settings, error = blocked
    disable_some(sandbox, 1)  # one more leaver: the plan made now is not the plan shown
    sandbox.scim.reset_counts()
    status, refused = sync(settings, approve_run=error.held_run, approval_reason="ok")
    assert status == 3 and "changed since run" in str(refused), refused
    assert scim_writes(sandbox) == 0


def test_approve_is_refused_when_atlassian_changed_since_a_full_read_plan(sandbox, state_url, sync):
    settings = sandbox.settings(state_url, max_deactivations=2)
    assert sync(settings)[0] == 0
    disable_some(sandbox, 4)
    status, error = sync(settings, full=True)  # planned against Atlassian as it is
    assert status == 3 and StateStore(state_url).held_plan(error.held_run)["full_read"] is True
    enabled = {u["userPrincipalName"] for u in sandbox.tenant.users.values() if u.get("accountEnabled", True)}
    someone = next(u for u in sandbox.scim.users() if u["active"] and u["userName"] in enabled)  # not a leaver
    sandbox.scim.edit_user_by_hand(someone["id"], title="Edited by hand")  # drift the held plan did not restore
    sandbox.scim.reset_counts()
    status, refused = sync(settings, approve_run=error.held_run, approval_reason="ok")
    assert status == 3 and "changed since run" in str(refused), refused
    assert scim_writes(sandbox) == 0


def test_the_command_line_says_how_to_approve_and_approve_applies_it(sandbox, state_url, tmp_path, capsys, sync):
    config = tmp_path / "guardsync.toml"
    config.write_text(to_toml(sandbox.config(state_url, max_deactivations=2)))
    assert main(["sync", "--config", str(config)]) == 0
    disable_some(sandbox, 3)
    capsys.readouterr()
    assert main(["sync", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "to apply exactly this plan" in line)
    command = line.split(": ", 2)[-1].split()
    assert command[:4] == ["guardsync", "approve", "--config", str(config)], line
    with pytest.raises(SystemExit):  # --reason is required
        main(["approve", "--config", str(config), command[4]])
    assert main(["approve", "--config", str(config), command[4], "--reason", "planned leavers"]) == 0
    assert sum(not a for a in active_users(sandbox).values()) == 3


def test_the_group_size_cap_is_never_held_for_approval(sandbox, state_url, sync):
    status, error = sync(sandbox.settings(state_url, max_group_size=5))
    assert status == 3 and error.rule == "group_too_large" and getattr(error, "held_run", None) is None
    assert StateStore(state_url).held_plans() == []


# -- the pause in the Prefect UI ------------------------------------------------------------------------------


class Paused:
    """A sync run in a thread, told it is a deployment's run, so an approvable guard pauses it."""

    def __init__(self, monkeypatch, settings):
        import tasks.approval
        from tests.conftest import run_sync

        monkeypatch.setattr(tasks.approval, "deployed", lambda: True)
        monkeypatch.setattr(tasks.approval, "POLL_SECONDS", 1)
        self.state_url = settings.sync.state
        self.result = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", run_sync(settings)), daemon=True)
        self.thread.start()

    def flow_run(self, timeout: float = 120):
        """The paused flow run, once it waits for input."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["PAUSED"]))))
                waiting = [run for run in runs if run.state.state_details.run_input_keyset  # this test's run
                           and run.parameters["settings"]["sync"]["state"] == self.state_url]
                if waiting:
                    return waiting[0]
                assert self.thread.is_alive(), self.result
                time.sleep(0.5)
        raise AssertionError("the run never paused")

    def answer(self, **form):
        from prefect.flow_runs import resume_flow_run

        resume_flow_run(self.flow_run().id, run_input=form)

    def finish(self, timeout: float = 120):
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.result

    def stop(self):
        """A test that failed midway leaves no run waiting (its thread would poll for a day)."""
        if self.thread.is_alive():
            try:
                self.answer(decision="reject", reason="the test ended", plan_digest="")
            finally:
                self.thread.join(60)


@pytest.fixture
def pause(monkeypatch):
    started = []

    def start(settings) -> Paused:
        started.append(Paused(monkeypatch, settings))
        return started[-1]

    yield start
    for paused in started:
        paused.stop()


def form_defaults(flow_run) -> dict:
    """The form's schema as the UI reads it: the plan digest it fills in, the description it shows."""
    from prefect import get_client

    keyset = flow_run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        schema = client.read_flow_run_input(flow_run.id, keyset["schema"])
        description = client.read_flow_run_input(flow_run.id, keyset["description"])
    import json

    return {"schema": json.loads(schema), "description": json.loads(description)}


def synced_once_then_blocked(sandbox, state_url, sync, **options):
    settings = sandbox.settings(state_url, max_deactivations=2, **options)
    assert sync(settings)[0] == 0
    disable_some(sandbox, 4)
    sandbox.scim.reset_counts()
    return settings


def test_a_paused_run_approved_in_the_ui_applies_the_plan_it_showed(sandbox, state_url, sync, pause):
    settings = synced_once_then_blocked(sandbox, state_url, sync)
    paused = pause(settings)
    flow_run = paused.flow_run()
    form = form_defaults(flow_run)
    digest = form["schema"]["properties"]["plan_digest"]["default"]
    assert "max&#95;deactivations" in form["description"] and digest in form["description"]
    assert StateStore(state_url).held_plan(str(flow_run.id))["status"] == "waiting"
    # While it waits, it holds the directory: another (scheduled) run does nothing, quietly.
    status, other = sync(settings)
    assert status == 0 and other.status == "waiting" and str(flow_run.id) in other.message, other
    assert scim_writes(sandbox) == 0
    paused.answer(decision="approve", reason="expected leavers", approver="Ada", plan_digest=digest)
    status, summary = paused.finish()
    assert status == 0, summary
    assert summary.counts["users_deactivated"] == 4 and "approved by Ada in the Prefect UI" in summary.approval
    held = StateStore(state_url).held_plan(str(flow_run.id))
    assert (held["status"], held["decided_by"], held["reason"]) == ("applied", "Ada", "expected leavers")


def test_a_paused_run_rejected_in_the_ui_ends_blocked_and_writes_nothing(sandbox, state_url, sync, pause):
    settings = synced_once_then_blocked(sandbox, state_url, sync)
    paused = pause(settings)
    flow_run = paused.flow_run()
    paused.answer(decision="reject", reason="not expected: check the HR feed", approver="Grace",
                  plan_digest=form_defaults(flow_run)["schema"]["properties"]["plan_digest"]["default"])
    status, error = paused.finish()
    assert status == 3 and "rejected by Grace: not expected" in str(error), error
    assert scim_writes(sandbox) == 0 and all(active_users(sandbox).values())
    assert StateStore(state_url).held_plan(str(flow_run.id))["status"] == "rejected"


def test_an_answer_for_another_plan_is_refused(sandbox, state_url, sync, pause):
    settings = synced_once_then_blocked(sandbox, state_url, sync)
    paused = pause(settings)
    paused.answer(decision="approve", reason="looks fine", plan_digest="0" * 32)
    status, error = paused.finish()
    assert status == 3 and "is not this plan's" in str(error) and scim_writes(sandbox) == 0


def test_a_paused_run_nobody_answers_ends_blocked_and_can_be_approved_from_the_terminal(sandbox, state_url, sync,
                                                                                       pause, monkeypatch):
    settings = synced_once_then_blocked(sandbox, state_url, sync, approval_timeout_hours=3 / 3600)  # 3 s
    paused = pause(settings)
    status, error = paused.finish()
    assert status == 3 and "nobody answered within" in str(error), error
    assert scim_writes(sandbox) == 0
    assert StateStore(state_url).held_plan(error.held_run)["status"] == "expired"
    import tasks.approval

    monkeypatch.setattr(tasks.approval, "deployed", lambda: False)  # the terminal's run is not a deployment's
    status, summary = sync(settings, approve_run=error.held_run, approval_reason="approved late, from the terminal")
    assert status == 0 and summary.counts["users_deactivated"] == 4, summary


def test_a_plan_left_waiting_by_a_run_that_died_can_be_approved_from_the_terminal(state_url, sync, blocked):
    settings, error = blocked
    store = StateStore(state_url)
    held = store.held_plan(error.held_run)
    # As a deployment run killed while it waited leaves it: "waiting", and no run holds the directory.
    store.hold_plan(error.held_run, held["digest"], held["rules"].split(","), held["message"], held["counts"],
                    held["full_read"], "waiting")
    assert store.lock_holder_run() is None
    status, summary = sync(settings, approve_run=error.held_run, approval_reason="its run died while it waited")
    assert status == 0 and summary.counts["users_deactivated"] == 5, summary
