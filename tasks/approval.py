"""Approval: a plan an approvable guard holds is applied only as a person approved it (DESIGN.md, "Approval").

- A deployment run pauses for an answer in the Prefect UI (`pause_flow_run` with a form): approve or reject,
  with a reason. Approval applies exactly the plan shown: the run goes on with the plan it holds in memory,
  nothing is read again; the form carries the plan's digest, and an answer for another digest is refused.
  Rejection, or no answer within `[sync] approval_timeout_hours`, ends the run blocked.
- A command-line run keeps exit 3 and holds its plan in the state store: `guardsync approve RUN_ID` makes
  the plan again (reading as that run read) and applies it only when it is that very plan (same digest):
  a plan that differs means Entra or Atlassian changed since, and nothing is written.
- While a run waits, it keeps the directory lock (its heartbeat renews it): other runs of the directory
  write nothing (a scheduled one ends quietly, guardsync.state.WaitingForApproval). A retry of an approved
  run applies the rest of the same plan and is not asked again; the loads never write anything twice.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prefect import get_client, get_run_logger, runtime
from prefect.context import FlowRunContext
from prefect.input import RunInput, keyset_from_paused_state
from prefect.input.run_input import run_input_subclass_from_type
from prefect.states import Paused, Running
from prefect.utilities.engine import propose_state_sync
from pydantic import Field

from guardsync.changes import Hold, Plan, blocked_by
from guardsync.errors import GuardsyncBlocked, GuardsyncError
from guardsync.models import content_digest
from guardsync.state import StateStore
from guardsync.text import md, plain
from tasks.results import TYPE, encode

if TYPE_CHECKING:
    from guardsync.access import AccessPlan

POLL_SECONDS = 5  # how often a paused run asks Prefect whether it was answered
SERVER_GRACE_SECONDS = 600  # the server fails a paused run this long after guardsync's deadline (a dead process)


class ApprovalForm(RunInput):
    """The form the Prefect UI shows on a paused run (its description holds the plan's summary)."""

    decision: Literal["approve", "reject"] = Field(
        "reject", description="approve applies exactly the plan shown; reject ends the run blocked")
    reason: str = Field(min_length=1, max_length=2000, description="why: kept in the audit and the summary")
    approver: str = Field("", max_length=200, description="your name, for the audit")
    plan_digest: str = Field(description="the plan this answer is for (filled in; leave it as it is)")


@dataclass(frozen=True)
class Approval:
    """A held plan a person approved: which run made it, who approved it where, and why."""

    held_run: str
    by: str
    reason: str
    where: str  # "the Prefect UI" | "the terminal"
    digest: str

    def line(self) -> str:
        return (f"the plan of run {self.held_run} (digest {self.digest}) was approved by {self.by or 'an operator'} "
                f"in {self.where}: {self.reason}")


def plan_digest(plan: Plan, access: AccessPlan | None) -> str:
    """Of exactly what the plan changes (the guards it trips aside), in an order that does not depend on the
    order Entra or Atlassian listed things in: two reads of an unchanged world give the same digest."""
    document = encode({"plan": dataclasses.replace(plan, holds=[]),
                       "access": dataclasses.replace(access, holds=[]) if access is not None else None})
    return content_digest(_canonical(document))


def _canonical(value):
    """Lists (collections of changes, ids) sorted; a tuple's items and a mapping's (key, value) pairs keep
    their positions: only the order of the pairs is free."""
    if isinstance(value, dict):
        kind = value.get(TYPE)
        if kind == "tuple":
            return {**value, "items": [_canonical(item) for item in value["items"]]}
        if kind == "dict":
            return {**value, "items": _sorted([[_canonical(k), _canonical(v)] for k, v in value["items"]])}
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return _sorted([_canonical(item) for item in value])
    return value


def _sorted(items: list) -> list:
    return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))


def holds_of(plan: Plan, access: AccessPlan | None) -> list[Hold]:
    return plan.holds + (access.holds if access is not None else [])


def deployed() -> bool:
    """A run of a deployment (a person can answer it in the Prefect UI); else a command-line run."""
    return runtime.deployment.id is not None


def settle_holds(plan: Plan, access: AccessPlan | None, *, store: StateStore, run_id: str, full_read: bool,
                 counts: dict, timeout_hours: float, approve_run: str | None = None, reason: str = "") -> Approval | None:
    """None when no guard holds the plan; the Approval to apply it with; else raises GuardsyncBlocked."""
    holds = holds_of(plan, access)
    digest = plan_digest(plan, access)
    if approve_run:
        return _approve_from_terminal(store, approve_run, digest, run_id, reason)
    if not holds:
        return None
    earlier = store.held_plan(run_id)
    if earlier and earlier["status"] in ("approved", "applied") and earlier["digest"] == digest:
        get_run_logger().info("the plan was approved earlier by %s: this retry applies the rest of it",
                              plain(earlier["decided_by"] or "an operator"))
        return Approval(run_id, earlier["decided_by"] or "", earlier["reason"] or "", "the Prefect UI", digest)
    rules, message = [hold.rule for hold in holds], "; ".join(hold.message for hold in holds)
    if not deployed():
        store.hold_plan(run_id, digest, rules, message, counts, full_read, "held")
        raise _blocked(holds, f"To apply exactly this plan: guardsync approve RUN_ID (the run id {run_id}) with a "
                       "reason; it is refused if Entra or Atlassian changed since", held_run=run_id)
    store.hold_plan(run_id, digest, rules, message, counts, full_read, "waiting")
    try:
        answer = _ask(holds, counts, digest, timeout_hours)
    except BaseException as exc:  # cancelled, or Prefect unreachable: nothing waits any more; the terminal may approve
        store.decide_plan(run_id, "expired", reason=f"the wait ended: {type(exc).__name__}")
        raise
    if answer is None:
        store.decide_plan(run_id, "expired")
        raise _blocked(holds, f"nobody answered within {timeout_hours:g} hours ([sync] approval_timeout_hours): nothing "
                       f"was written; run it again, or apply exactly this plan with guardsync approve {run_id}",
                       held_run=run_id)
    by = answer.approver.strip()
    if answer.decision == "approve" and answer.plan_digest.strip() == digest:
        store.decide_plan(run_id, "approved", by=by, reason=answer.reason, applied_by=run_id)
        get_run_logger().info("plan approved by %s: %s", plain(by or "an operator"), plain(answer.reason))
        return Approval(run_id, by, answer.reason, "the Prefect UI", digest)
    why = answer.reason if answer.decision == "reject" else \
        f"the form's plan digest {answer.plan_digest!r} is not this plan's ({digest}): not applied"
    store.decide_plan(run_id, "rejected", by=by, reason=why)
    raise _blocked(holds, f"rejected by {by or 'an operator'}: {why}; nothing was written")


def _approve_from_terminal(store: StateStore, held_run: str, digest: str, run_id: str, reason: str) -> Approval:
    held = store.held_plan(held_run)
    if held is None:
        raise GuardsyncError(f"no plan of run {held_run} is held for this directory: give the run id a blocked run "
                             "printed (guardsync history lists the runs)")
    status, applied_by = held["status"], held["applied_by"]
    if status == "waiting" and store.lock_holder_run() == held_run:  # else its process died while it waited
        raise GuardsyncError(f"run {held_run} waits for an answer in the Prefect UI: approve or reject it there")
    if status == "rejected":
        raise GuardsyncBlocked("approval", f"the plan of run {held_run} was rejected by {held['decided_by'] or 'an operator'}"
                               f" ({held['reason']}); nothing was written", "run guardsync sync to make a new plan")
    if status == "applied" and applied_by != run_id:
        raise GuardsyncError(f"the plan of run {held_run} was already applied (run {applied_by}); nothing was written")
    if held["digest"] != digest:
        raise GuardsyncBlocked(
            "approval", f"Entra or Atlassian changed since run {held_run} made its plan: the plan made now (digest "
            f"{digest}) is not the one held ({held['digest']}); nothing was written",
            "Run guardsync sync to make the plan as it is now; if a guard holds it, approve that run's plan")
    by = _terminal_user()
    if not (status == "approved" and applied_by == run_id):  # approved earlier, its run stopped: approve again
        store.decide_plan(held_run, "approved", by=by, reason=reason, applied_by=run_id, audit_run=run_id)
    return Approval(held_run, by, reason, "the terminal", digest)


def _terminal_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name on this system (a container with an unnamed uid)
        return ""


def _blocked(holds: list[Hold], note: str, held_run: str | None = None) -> GuardsyncBlocked:
    blocked = blocked_by(holds, note)
    blocked.held_run = held_run
    return blocked


def _ask(holds: list[Hold], counts: dict, digest: str, timeout_hours: float) -> ApprovalForm | None:
    """Pause the run until a person answers in the Prefect UI; None when nobody does in time."""
    form = ApprovalForm.with_initial_data(description=form_description(holds, counts, digest, timeout_hours),
                                          plan_digest=digest)
    get_run_logger().warning("a guard holds this run's plan: approve or reject it in the Prefect UI (Resume) within "
                             "%g hours; nothing is written until then", timeout_hours)
    return _pause_for(form, timeout_hours * 3600)


def _pause_for(form: type[ApprovalForm], seconds: float) -> ApprovalForm | None:
    """Prefect's pause_flow_run, with guardsync's own deadline: the run waits `seconds` for an answer, then takes
    itself back (Running) and ends blocked with its own message. The server is told a later deadline, so it
    fails the run itself ("paused and never resumed") only when this process died while it waited."""
    context = FlowRunContext.get()
    flow_run_id = context.flow_run.id
    # A key of its own for each pause: a retry of a rejected run is asked again, never handed the old answer.
    paused = Paused(timeout_seconds=round(seconds + SERVER_GRACE_SECONDS), reschedule=False,
                    pause_key=f"approval-{uuid.uuid4().hex[:12]}")
    form = run_input_subclass_from_type(form)
    keyset = keyset_from_paused_state(paused)
    paused.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client, paused, flow_run_id=flow_run_id)
        if not state.is_paused():
            raise RuntimeError(f"Prefect did not pause the run for approval (its state: {state.name})")
        form.save(keyset)
        deadline = time.monotonic() + seconds
        while True:
            time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception as exc:  # noqa: BLE001 - the server restarting: ask again at the next poll
                get_run_logger().warning("could not read this run's state (%s); asking again", type(exc).__name__)
                state = None
            if state is not None and state.is_running():  # resumed with the form: the answer
                return form.load(keyset)
            if state is not None and (state.is_final() or state.is_cancelling()):
                return None  # cancelled or failed from outside: nobody approves it any more
            if time.monotonic() >= deadline:
                break
        state = propose_state_sync(client, Running(message="no answer in time"), flow_run_id=flow_run_id)
        if state.is_running() and client.read_flow_run(flow_run_id).state.is_running():
            try:  # answered in the last moment, before the run took itself back
                return form.load(keyset)
            except Exception:  # noqa: BLE001 - no input was given: nobody answered
                return None
    return None


def form_description(holds: list[Hold], counts: dict, digest: str, timeout_hours: float) -> str:
    """What the UI shows above the form: why the run waits and what the plan changes (names as text)."""
    lines = ["## guardsync holds this run's plan for approval", ""]
    lines += [f"- **{md(hold.rule)}**: {md(hold.message)}" for hold in holds]
    lines += ["", "| change | count |", "|---|---|"] + [f"| {md(key)} | {value} |" for key, value in counts.items() if value]
    lines += ["", "Every change is in this run's `plan` and `plan-changes` artifacts.",
              f"**Approve** applies exactly this plan (digest `{digest}`), with nothing read again; **reject** ends "
              f"the run blocked. Without an answer within {timeout_hours:g} hours the run ends blocked."]
    return "\n".join(lines)
