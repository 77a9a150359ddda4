"""A new grant's maker goes into the ledger before the grant is asked for (StateStore.intend_grant), so a run
killed once Atlassian applied it, before it was recorded, leaves a grant of guardsync's (the third deep model
run's history, tests/test_model_regressions.py). These pin down the intent row itself, with the real store and
loader and a stand-in Organizations API (no I/O): taken back when Atlassian refuses, confirmed when it applies,
never left claiming a grant Atlassian refused (a later hand-made grant would then count as guardsync's)."""

from __future__ import annotations

import pytest

from guardsync.access import BY_HAND, GUARDSYNC, make_access_plan
from guardsync.access_load import AccessLoader
from guardsync.admin import Workspace
from guardsync.errors import ApiError, TransientError
from guardsync.state import StateStore

WORKSPACES = {"ws1": Workspace("ws1", "jira-software", "acme.atlassian.net", None, None)}


class Admin:
    """The Organizations API's role assignments of one group, answering as told."""

    def __init__(self, error: Exception | None = None, applied_before_error: bool = False):
        self.error, self.applied_before_error = error, applied_before_error
        self.held: dict[str, set[str]] = {}

    def find_groups(self, names):
        return {name.casefold(): f"org-{name}" for name in names}

    def assign(self, org_id, workspace_id):
        if self.error is None or self.applied_before_error:
            self.held.setdefault(org_id, set()).add(workspace_id)
        if self.error is not None:
            raise self.error

    def revoke(self, org_id, workspace_id):
        self.held.get(org_id, set()).discard(workspace_id)

    def granted(self, org_id):
        return set(self.held.get(org_id, set()))


def plan(store: StateStore, configured: set[str], held: set[str]):
    return make_access_plan({"G": frozenset(configured)} if configured else {}, {"G": frozenset(held)},
                            store.load_grants(), {}, {"G": "grp"}, WORKSPACES, {"G": frozenset({"u1"})},
                            {"G": frozenset({"u1"})}, org_ids={"G": "org-grp"})


@pytest.fixture
def store(tmp_path):
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


def test_a_refused_grant_leaves_no_row_and_a_later_hand_grant_is_hand_made(store):
    AccessLoader(Admin(ApiError("forbidden", status=403)), store, "run-1", plan(store, {"ws1"}, set())).load()
    assert store.load_grants() == {}
    later = plan(store, {"ws1"}, {"ws1"})  # an admin granted it by hand meanwhile
    assert [(g.workspace_id, g.maker) for g in later.hand_made] == [("ws1", BY_HAND)]


def test_an_intent_an_error_left_is_taken_back_when_the_retry_is_refused(store):
    first = plan(store, {"ws1"}, set())
    with pytest.raises(TransientError):  # neither yes nor no: the row stays, unconfirmed
        AccessLoader(Admin(TransientError("timed out")), store, "run-1", first).load()
    assert store.load_grants() == {("G", "ws1"): GUARDSYNC}
    retried = AccessLoader(Admin(ApiError("refused", status=400)), store, "run-1", first)
    retried.load()
    assert retried.report.failures
    assert store.load_grants() == {}  # before: still guardsync's, though Atlassian never held it


def test_a_grant_applied_before_an_error_is_confirmed_by_the_retry_and_revocable(store):
    first = plan(store, {"ws1"}, set())
    admin = Admin(TransientError("timed out"), applied_before_error=True)
    with pytest.raises(TransientError):
        AccessLoader(admin, store, "run-1", first).load()
    assert store.grants_confirmed_in("run-1") == set()  # an intent is not a confirmation: the retry asks again
    admin.error = None
    AccessLoader(admin, store, "run-1", first).load()
    assert store.grants_confirmed_in("run-1") == {("G", "ws1")}
    unconfigured = plan(store, set(), {"ws1"})
    assert [g.workspace_id for g in unconfigured.revokes] == ["ws1"]
