"""Faults on both edges: the run completes correctly after retries, or fails having written nothing wrong.

Every case runs the real flow in-process against the sandbox (HTTPS on loopback),
injects faults with `Fault(...)`, and compares the final Atlassian state with that of
an uninterrupted run on an identical fresh sandbox (same tenant seed), plus the exit
status the contract promises (0 completed, 1 failed, 3 blocked).

Retry budgets and timeouts are production values (120 s of client retries, task
retries 30 s apart, 10/60 s connect/read timeouts) and are not settings: the
`fast_retries` and `short_timeouts` fixtures shrink them by monkeypatching so a
permanent fault fails in seconds instead of minutes.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import requests

from guardsync.errors import AuthError, GuardsyncBlocked, TransientError
from guardsync.sandbox.http import Fault
from guardsync.sandbox.stack import API_KEY_ENV, SECRET_ENV

SANDBOX_ENV = ("REQUESTS_CA_BUNDLE", SECRET_ENV, API_KEY_ENV)

WRITES = ("POST", "PUT", "PATCH", "DELETE")
USERS, GROUPS, SEED = 80, 8, 11
SCIM_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
POST_USERS = r"/Users\?$"  # full_path is "path?query"; a POST has no query
POST_GROUPS = r"/Groups\?$"
# The second and later pages of a Graph listing, full read or delta round alike (they carry a $skiptoken).
USERS_NEXT_PAGE = r"^/v1\.0/users(/delta)?\?.*skiptoken"
MEMBERS_NEXT_PAGE = r"^/v1\.0/groups/(delta\?|[^/]+/members\?).*skiptoken"  # members@delta ride on group pages
MEMBERS = r"^/v1\.0/groups/(delta|[^/]+/members)"


# -- helpers shared with the other fault, kill and bad-input tests ------------------------


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def atlassian_state(sandbox) -> dict:
    """What Atlassian holds, independent of SCIM ids: users by userName, groups by name with member userNames.

    Fails on duplicates (two users with one userName, two groups with one name, ignoring case)
    and on a member that is no user.
    """
    users = sandbox.scim.users()
    groups = sandbox.scim.groups()
    names = {u["id"]: u["userName"] for u in users}
    user_keys = [u["userName"].casefold() for u in users]
    assert len(user_keys) == len(set(user_keys)), f"duplicate userName: {sorted(k for k in user_keys if user_keys.count(k) > 1)}"
    group_keys = [g["displayName"].casefold() for g in groups]
    assert len(group_keys) == len(set(group_keys)), f"duplicate group: {sorted(k for k in group_keys if group_keys.count(k) > 1)}"
    external = [u.get("externalId") for u in users if u.get("externalId")]
    assert len(external) == len(set(external)), "two Atlassian users carry one Entra object id"
    state_users = {
        u["userName"]: (
            u.get("externalId"), u.get("active"), u.get("displayName"), u.get("title"),
            (u.get("name") or {}).get("givenName"), (u.get("name") or {}).get("familyName"),
            tuple(e["value"] for e in u.get("emails") or [] if e.get("primary")),
        )
        for u in users
    }
    state_groups = {}
    for group in groups:
        member_ids = [m["value"] for m in group.get("members") or []]
        assert all(m in names for m in member_ids), f"group {group['displayName']} holds a member that is no user"
        assert len(member_ids) == len(set(member_ids)), f"group {group['displayName']} lists a member twice"
        state_groups[group["displayName"]] = (group.get("externalId"), frozenset(names[m] for m in member_ids))
    return {"users": state_users, "groups": state_groups}


def assert_same_state(actual: dict, expected: dict) -> None:
    missing_users = set(expected["users"]) - set(actual["users"])
    extra_users = set(actual["users"]) - set(expected["users"])
    assert not missing_users and not extra_users, f"missing users {sorted(missing_users)[:5]}, extra {sorted(extra_users)[:5]}"
    wrong = {n: (actual["users"][n], expected["users"][n]) for n in expected["users"] if actual["users"][n] != expected["users"][n]}
    assert not wrong, f"users differ (actual, expected): {list(wrong.items())[:3]}"
    assert set(actual["groups"]) == set(expected["groups"])
    for name, (external_id, members) in expected["groups"].items():
        got_id, got_members = actual["groups"][name]
        assert got_id == external_id, name
        assert got_members == members, f"{name}: missing {sorted(members - got_members)[:5]}, extra {sorted(got_members - members)[:5]}"


def nontrivial(state: dict) -> dict:
    """A reference worth comparing with: users, groups, and memberships."""
    assert len(state["users"]) > 40 and len(state["groups"]) >= 8
    assert sum(len(members) for _, members in state["groups"].values()) > 50
    return state


_references: dict[tuple, dict] = {}


@pytest.fixture
def sandbox(make_sandbox):
    """The tenant of these tests (smaller than conftest's default)."""
    return make_sandbox(users=USERS, groups=GROUPS, seed=SEED)


@pytest.fixture
def reference(make_sandbox, sync, tmp_path_factory):
    """The Atlassian state an uninterrupted first run leaves on a fresh sandbox of the same tenant (cached)."""

    def get(users=USERS, groups=GROUPS, seed=SEED, **sync_options) -> dict:
        key = (users, groups, seed, tuple(sorted((k, str(v)) for k, v in sync_options.items())))
        if key not in _references:
            # The fresh sandbox exports its own CA and secrets: put back those of the test's sandbox afterwards.
            saved = {name: os.environ.get(name) for name in (*SANDBOX_ENV,)}
            fresh = make_sandbox(users=users, groups=groups, seed=seed)
            state = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'state.db'}"
            status, summary = sync(fresh.settings(state, **sync_options))
            assert status == 0, summary
            _references[key] = nontrivial(atlassian_state(fresh))
            fresh.stop()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return _references[key]

    return get


@pytest.fixture
def fast_retries(monkeypatch):
    """Client retry budgets of 1.5 s and task retries without the 30 s pause: a permanent fault fails fast."""
    from guardsync.graph import GraphClient
    from guardsync.scim import ScimClient

    monkeypatch.setitem(GraphClient.__init__.__kwdefaults__, "max_retry_seconds", 1.5)
    monkeypatch.setitem(ScimClient.__init__.__kwdefaults__, "max_retry_seconds", 1.5)
    _tune_clients(monkeypatch, max_retry_seconds=1.5)  # the flow passes [sync] retry_budget_seconds
    import tasks.extract
    import tasks.load

    # The flow imports its stages where it runs them: patched in their modules, it finds the patched tasks.
    for module, name in ((tasks.extract, "extract"), (tasks.load, "load_users"), (tasks.load, "load_groups"),
                         (tasks.load, "load_memberships")):
        monkeypatch.setattr(module, name, getattr(module, name).with_options(retry_delay_seconds=0))


@pytest.fixture
def small_pages(monkeypatch):
    """Graph pages of 20 objects, so listings span several pages (full reads and delta rounds alike)."""
    import guardsync.graph

    monkeypatch.setattr(guardsync.graph, "PAGE_SIZE", 20)

    def apply(sandbox):
        sandbox.graph.delta_page_objects = 20
        sandbox.graph.delta_page_links = 20
        return sandbox

    return apply


@pytest.fixture
def short_timeouts(monkeypatch):
    """Read timeouts of 0.5 s on both clients (production: 60 s), so a Fault(delay=2) is a timeout."""
    import guardsync.graph
    import guardsync.scim

    monkeypatch.setattr(guardsync.graph, "TIMEOUT", (5, 0.5))
    monkeypatch.setattr(guardsync.scim, "TIMEOUT", (5.0, 0.5))
    _tune_clients(monkeypatch, timeout=(5.0, 0.5))  # the flow passes [sync] request_timeout_seconds


def _tune_clients(monkeypatch, **attributes) -> None:
    """Set attributes of the clients the flow builds from the settings."""
    import flows.sync_directory as flow_module

    built = flow_module.connect

    def connect(settings, dry_run):
        graph, scim, store = built(settings, dry_run)
        for client in (graph, scim):
            for name, value in attributes.items():
                setattr(client, name, value)
        return graph, scim, store

    monkeypatch.setattr(flow_module, "connect", connect)


def scim_error(status: int, detail: str, scim_type: str | None = None) -> str:
    body = {"schemas": [SCIM_ERROR], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    return json.dumps(body)


def graph_error(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def first_sync(sandbox, state_url, sync) -> dict:
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    sandbox.scim.reset_counts()
    sandbox.graph.reset_counts()
    return atlassian_state(sandbox)


def enabled_members_in_scope(tenant) -> list[str]:
    """Ids of the enabled, non-guest users of the synced domains, sorted: the users a second run can change."""
    return sorted(uid for uid, u in tenant.users.items() if u["accountEnabled"] and "#EXT#" not in u["userPrincipalName"]
                  and u["userPrincipalName"].endswith(("@contoso.com", "@fabrikam.com")))


def recorded_users(state_url: str) -> set[str]:
    from guardsync.state import StateStore

    store = StateStore(state_url)
    try:
        return set(store.load().users)
    finally:
        store.dispose()


# -- Microsoft Graph faults ------------------------------------------------------------------

@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([Fault("GET", r"^/v1\.0/", 429, times=12, headers={"Retry-After": "0"}),
                      Fault("GET", r"^/v1\.0/users", 429, times=2, headers={"Retry-After": "1"})], id="429-storm-retry-after"),
        pytest.param([Fault("GET", r"^/v1\.0/users", 503, times=2), Fault("GET", MEMBERS, 504, times=3, headers={"Retry-After": "1"}),
                      Fault("GET", r"^/v1\.0/organization", 500, times=1), Fault("GET", r"^/v1\.0/domains", 502, times=1)], id="5xx"),
        pytest.param([Fault("GET", r"^/v1\.0/users", reset=True, times=2), Fault("GET", MEMBERS, reset=True, times=2)],
                     id="connection-reset"),
        pytest.param([Fault("POST", r"/oauth2/v2\.0/token", 429, times=1, headers={"Retry-After": "1"},
                            body=json.dumps({"error": "temporarily_unavailable", "error_description": "AADSTS50196: throttled"}))],
                     id="token-endpoint-429"),
        pytest.param([Fault("POST", r"/oauth2/v2\.0/token", 503, times=2, headers={"Retry-After": "1"})], id="token-endpoint-503"),
        pytest.param([Fault("POST", r"/oauth2/v2\.0/token", reset=True, times=1)], id="token-endpoint-reset"),
        pytest.param([Fault("GET", r"^/v1\.0/organization", reset=True, times=1)], id="first-graph-request-reset"),
        pytest.param([Fault("GET", r"^/v1\.0/organization", 503, times=1)], id="first-graph-request-503"),
    ],
)
def test_transient_graph_faults_are_retried_to_the_same_result(faults, sandbox, state_url, sync, reference):
    faults = copy.deepcopy(faults)  # the parameters are shared: each run counts down its own faults
    for fault in faults:
        sandbox.graph.inject(fault)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert all(fault.times == 0 for fault in faults), "every injected fault was served"
    assert_same_state(atlassian_state(sandbox), reference())


def test_graph_timeouts_are_retried(make_sandbox, state_url, sync, reference, short_timeouts):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    users = sandbox.graph.inject(Fault("GET", r"^/v1\.0/users", delay=2.0, times=1))
    members = sandbox.graph.inject(Fault("GET", MEMBERS, delay=2.0, times=2))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert users.times == members.times == 0
    assert_same_state(atlassian_state(sandbox), reference())


@pytest.mark.parametrize("body", ['{"value": [{"id": "', '{"@odata.context": "x", "value": [', "<html>502 Bad Gate"])
def test_a_truncated_page_is_read_again(body, make_sandbox, state_url, sync, reference, small_pages):
    sandbox = small_pages(make_sandbox(users=USERS, groups=GROUPS, seed=SEED))
    fault = sandbox.graph.inject(Fault("GET", USERS_NEXT_PAGE, 200, body=body, times=1))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert fault.times == 0
    assert_same_state(atlassian_state(sandbox), reference())


def test_a_token_that_expires_mid_run_is_renewed(make_sandbox, state_url, sync, reference, small_pages):
    sandbox = small_pages(make_sandbox(users=USERS, groups=GROUPS, seed=SEED))
    sandbox.graph.token_lifetime = 0.3  # the answer still announces an hour, as a revoked or clock-skewed token does
    sandbox.graph.latency = 0.05  # the read (about 20 requests) outlives the token
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.graph.rejected_tokens >= 1
    assert sandbox.graph.total("POST") >= 2  # a second token was asked for
    assert_same_state(atlassian_state(sandbox), reference())


@pytest.mark.parametrize(
    "fault, error",
    [
        pytest.param(Fault("GET", USERS_NEXT_PAGE, 503, times=10**6), TransientError, id="users-page-2-503"),
        pytest.param(Fault("GET", USERS_NEXT_PAGE, 429, times=10**6, headers={"Retry-After": "1"}),
                     TransientError, id="users-page-2-429"),
        pytest.param(Fault("GET", USERS_NEXT_PAGE, reset=True, times=10**6), TransientError, id="users-page-2-reset"),
        pytest.param(Fault("GET", MEMBERS_NEXT_PAGE, 500, times=10**6), TransientError, id="members-page-2-500"),
        pytest.param(Fault("GET", USERS_NEXT_PAGE, 400, times=10**6,
                           body=graph_error("BadRequest", "Invalid $skiptoken")), None, id="users-page-2-400"),
        pytest.param(Fault("GET", USERS_NEXT_PAGE, 403, times=10**6,
                           body=graph_error("Authorization_RequestDenied", "Insufficient privileges")), AuthError,
                     id="users-page-2-403"),
        pytest.param(Fault("GET", USERS_NEXT_PAGE, 200, body="{truncated", times=10**6), TransientError,
                     id="users-page-2-always-truncated"),
    ],
)
@pytest.mark.parametrize("read", ["full", "delta"])
def test_a_next_link_that_fails_for_good_writes_nothing(read, fault, error, make_sandbox, state_url, sync, small_pages, fast_retries):
    """A first sync, then a run whose read fails half-way for good: no SCIM write at all, exit 1, nothing deactivated.

    `full`: the second run re-reads everything (--full), so its second page is a page of all users.
    `delta`: the second run reads the changes since the first, and there are enough to span pages.
    """
    fault = copy.deepcopy(fault)
    sandbox = small_pages(make_sandbox(users=USERS, groups=GROUPS, seed=SEED))
    before = first_sync(sandbox, state_url, sync)
    changes_needing_writes(sandbox.tenant)
    sandbox.graph.inject(fault)
    status, exc = sync(sandbox.settings(state_url), full=read == "full")
    assert status == 1, exc
    if error is not None:
        assert isinstance(exc, error), repr(exc)
    assert fault.times < 10**6  # the fault was met
    assert scim_writes(sandbox) == 0
    assert atlassian_state(sandbox) == before
    # Once Graph answers again, the same changes land: nothing was half-recorded.
    sandbox.graph.clear_faults()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    after = atlassian_state(sandbox)
    assert after["users"]["newcomer@contoso.com"][1] is True
    assert sum(1 for u in after["users"].values() if u[3] == "Fault Tolerance Lead") == 30


def changes_needing_writes(tenant) -> None:
    """Enough changes for a delta round of several 20-object pages, each one a SCIM write."""
    members = sorted(uid for uid, u in tenant.users.items() if u["accountEnabled"] and u["userPrincipalName"].endswith("@contoso.com")
                     and "#EXT#" not in u["userPrincipalName"] and u["userPrincipalName"] == u["userPrincipalName"].lower())
    for uid in members[:30]:
        tenant.update_user(uid, jobTitle="Fault Tolerance Lead")
    newcomer = tenant.add_user(userPrincipalName="newcomer@contoso.com", mail="newcomer@contoso.com")
    group = tenant.add_group("Fault Tolerance")
    for uid in [newcomer, *members[:25]]:
        tenant.add_member(group, uid)


def test_a_page_without_value_is_not_read_as_the_end(make_sandbox, state_url, sync, small_pages, fast_retries):
    """Valid JSON that is no collection page (no `value`, no nextLink) on page 2 of a full read: an error, never a short tenant."""
    sandbox = small_pages(make_sandbox(users=USERS, groups=GROUPS, seed=SEED))
    before = first_sync(sandbox, state_url, sync)
    fault = sandbox.graph.inject(Fault("GET", USERS_NEXT_PAGE, 200, body='{"@odata.context": "users"}', times=10**6))
    status, exc = sync(sandbox.settings(state_url, max_deactivations=100), full=True)
    assert fault.times < 10**6
    assert scim_writes(sandbox) == 0, dict(sandbox.scim.requests)
    assert status == 1, exc
    assert atlassian_state(sandbox) == before


# -- Atlassian SCIM faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([Fault("POST", POST_USERS, 429, times=3, headers={"Retry-After": "1"}),
                      Fault("PATCH", r"/Groups/", 429, times=2, headers={"Retry-After": "1"})], id="429-retry-after"),
        pytest.param([Fault("POST", POST_USERS, 429, times=4), Fault("POST", POST_GROUPS, 429, times=2),
                      Fault("PATCH", r"/Groups/", 429, times=2)], id="429-no-retry-after"),
        pytest.param([Fault("POST", POST_USERS, 500, times=3, body=scim_error(500, "Internal error")),
                      Fault("POST", POST_GROUPS, 503, times=2), Fault("PATCH", r"/Groups/", 502, times=2)], id="5xx"),
        pytest.param([Fault("POST", POST_USERS, 504, after_serving=True, times=4),
                      Fault("POST", POST_GROUPS, 504, after_serving=True, times=3),
                      Fault("PATCH", r"/Groups/", 504, after_serving=True, times=3)], id="504-after-applying"),
        pytest.param([Fault("POST", POST_USERS, after_serving=True, reset=True, times=3),
                      Fault("POST", POST_GROUPS, after_serving=True, reset=True, times=2),
                      Fault("PATCH", r"/Groups/", after_serving=True, reset=True, times=2)], id="reset-after-applying"),
        pytest.param([Fault("POST", POST_USERS, reset=True, times=3), Fault("GET", r"/Users\?.*filter", 503, times=2)],
                     id="reset-before-applying"),
    ],
)
def test_transient_scim_faults_neither_duplicate_nor_lose(faults, sandbox, state_url, sync, reference):
    faults = copy.deepcopy(faults)
    for fault in faults:
        sandbox.scim.inject(fault)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert all(fault.times == 0 for fault in faults)
    assert_same_state(atlassian_state(sandbox), reference())


def test_scim_timeouts_after_the_write_was_applied_do_not_duplicate(sandbox, state_url, sync, reference, short_timeouts):
    users = sandbox.scim.inject(Fault("POST", POST_USERS, 504, after_serving=True, delay=2.0, times=2))
    groups = sandbox.scim.inject(Fault("POST", POST_GROUPS, 504, after_serving=True, delay=2.0, times=1))
    patch = sandbox.scim.inject(Fault("PATCH", r"/Groups/", 504, after_serving=True, delay=2.0, times=1))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert users.times == groups.times == patch.times == 0
    assert_same_state(atlassian_state(sandbox), reference())


def test_faults_on_updates_deactivations_and_deletions_of_a_second_run(make_sandbox, state_url, sync, tmp_path):
    """PUT and DELETE lose their answers after applying; the run ends where a clean run ends."""

    def changes(sandbox):
        tenant = sandbox.tenant
        enabled = enabled_members_in_scope(tenant)
        for uid in enabled[:3]:
            tenant.update_user(uid, accountEnabled=False)
        for uid in enabled[3:6]:
            tenant.update_user(uid, jobTitle="Principal Fault Injector")
        doomed = sorted(tenant.groups)[-1]
        tenant.delete_group(doomed)

    clean = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    clean_state = f"sqlite:///{tmp_path / 'clean.db'}"
    first_sync(clean, clean_state, sync)
    changes(clean)
    assert sync(clean.settings(clean_state))[0] == 0
    expected = atlassian_state(clean)

    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    first_sync(sandbox, state_url, sync)
    changes(sandbox)
    faults = [sandbox.scim.inject(Fault("PUT", r"/Users/", 504, after_serving=True, times=3)),
              sandbox.scim.inject(Fault("PUT", r"/Users/", 429, times=2)),
              sandbox.scim.inject(Fault("DELETE", r"/Groups/", 504, after_serving=True, times=1))]
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert all(fault.times == 0 for fault in faults)
    assert_same_state(atlassian_state(sandbox), expected)
    assert sum(1 for u in expected["users"].values() if u[1] is False) >= 3  # the deactivations are in the comparison


def _delete_by_hand(sandbox, kind: str, scim_id: str) -> None:
    """What an admin does in Atlassian between runs (through the API, as any other client would)."""
    answer = requests.delete(f"{sandbox.scim.scim_url}/{kind}/{scim_id}", headers={"Authorization": f"Bearer {sandbox.api_key}"},
                             verify=str(sandbox.ca.ca_file), timeout=10)
    assert answer.status_code == 204


def _hand_delete_a_grouped_user(sandbox) -> tuple[str, str, dict]:
    """Delete (by hand, in Atlassian) the synced user who is in the most groups: (userName, Entra id, groups before)."""
    by_name = {u["userName"]: u for u in sandbox.scim.users()}
    groups_before = atlassian_state(sandbox)["groups"]
    victim = max(sorted(by_name), key=lambda n: sum(n in members for _, members in groups_before.values()))
    assert sum(victim in members for _, members in groups_before.values()) >= 2
    _delete_by_hand(sandbox, "Users", by_name[victim]["id"])
    assert victim not in atlassian_state(sandbox)["users"]
    return victim, by_name[victim]["externalId"], groups_before


def _assert_back_in_its_groups(sandbox, victim, entra_id, groups_before) -> dict:
    after = atlassian_state(sandbox)
    assert after["users"][victim][0] == entra_id and after["users"][victim][1] is True
    for name, (_, members) in groups_before.items():
        assert (victim in members) == (victim in after["groups"][name][1]), name
    return after


def test_a_user_deleted_by_hand_is_recreated_on_update(sandbox, state_url, sync):
    first_sync(sandbox, state_url, sync)
    victim, entra_id, groups_before = _hand_delete_a_grouped_user(sandbox)
    sandbox.tenant.update_user(entra_id, jobTitle="Re-created Engineer")  # a change, so the run PUTs and meets 404
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.total("PUT") >= 1 and sandbox.scim.total("POST") >= 1  # 404 on the PUT, then a create
    after = atlassian_state(sandbox)
    assert after["users"][victim][3] == "Re-created Engineer"
    _assert_back_in_its_groups(sandbox, victim, entra_id, groups_before)


def test_a_user_deleted_by_hand_is_recreated_with_its_groups_by_a_full_run(sandbox, state_url, sync, reference):
    first_sync(sandbox, state_url, sync)
    victim, entra_id, groups_before = _hand_delete_a_grouped_user(sandbox)
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0, summary
    _assert_back_in_its_groups(sandbox, victim, entra_id, groups_before)
    assert_same_state(atlassian_state(sandbox), reference())


def test_existing_users_and_groups_are_adopted_on_409(sandbox, state_url, sync, reference):
    expected = reference()
    name = sorted(expected["users"])[0]
    entra_id = expected["users"][name][0]
    # One made by hand (other case, no externalId), one left by an earlier run that died before recording it.
    sandbox.scim.add_user({"userName": name.upper(), "emails": [{"value": name, "primary": True}], "active": True})
    other = sorted(expected["users"])[1]
    sandbox.scim.add_user({"userName": other, "externalId": expected["users"][other][0],
                           "emails": [{"value": other, "primary": True}], "active": True})
    stranger = sandbox.scim.add_user({"userName": "stranger@contoso.com", "emails": [{"value": "stranger@contoso.com", "primary": True}]})
    group = sorted(expected["groups"])[0]
    sandbox.scim.add_group(group.swapcase(), [stranger["id"]])
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert summary.counts["users_adopted"] == 2 and summary.counts["groups_adopted"] == 1
    after = atlassian_state(sandbox)
    assert after["users"].pop("stranger@contoso.com")[1] in (True, None)  # untouched
    adopted_id, adopted_members = after["groups"].pop(group.swapcase())  # a change of case only is not a rename
    after["groups"][group] = (expected["groups"][group][0], adopted_members)  # externalId: see the test below
    assert after["users"][name][0] == entra_id
    assert_same_state(after, expected)


def test_an_adopted_group_carries_the_entra_id(sandbox, state_url, sync, reference):
    group = sorted(reference()["groups"])[0]
    sandbox.scim.add_group(group)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert atlassian_state(sandbox)["groups"][group][0] == reference()["groups"][group][0]


def test_a_rejected_scim_key_fails_with_the_one_year_advice_and_writes_nothing(sandbox, state_url, sync, monkeypatch):
    monkeypatch.setenv("GUARDSYNC_SANDBOX_SCIM_API_KEY", "ATSCIM-expired-key-1234567890")
    status, exc = sync(sandbox.settings(state_url))
    assert status == 1 and isinstance(exc, AuthError)
    message = str(exc)
    assert "401" in message and "one year" in message and "regenerate" in message and "atlassian.api_key" in message
    assert "ATSCIM-expired-key" not in message and "ATSCIM-expired-key" not in repr(exc)
    assert "\n" not in message
    assert sandbox.scim.users() == [] and sandbox.scim.groups() == []
    assert recorded_users(state_url) == set()


def test_a_key_revoked_mid_run_stops_the_run_and_the_next_run_finishes(sandbox, state_url, sync, reference):
    fault = sandbox.scim.inject(Fault("PATCH", r"/Groups/", 401, times=10**6, body=scim_error(401, "Unauthorized")))
    status, exc = sync(sandbox.settings(state_url))
    assert status == 1 and isinstance(exc, AuthError) and "one year" in str(exc)
    assert fault.times < 10**6
    partial = atlassian_state(sandbox)
    assert len(partial["users"]) == len(reference()["users"])  # users and groups landed before the memberships
    assert all(not members for _, members in partial["groups"].values())
    # Records are written a batch at a time: a stage that fails still records every write that landed.
    assert recorded_users(state_url) == {user["externalId"] for user in sandbox.scim.users()}
    sandbox.scim.clear_faults()
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.total("POST") == 0  # nothing to adopt: the failed run had recorded its creates
    assert_same_state(atlassian_state(sandbox), reference())


def test_a_stage_that_fails_midway_records_every_write_that_landed(sandbox, state_url, sync, reference):
    # The key is revoked after 40 user creates: the users stage fails in the middle of a record batch.
    sandbox.scim.inject(Fault("POST", POST_USERS, 401, times=10**6, skip=40, body=scim_error(401, "Unauthorized")))
    status, exc = sync(sandbox.settings(state_url))
    assert status == 1 and isinstance(exc, AuthError)
    created = {user["externalId"] for user in sandbox.scim.users()}
    assert len(created) == 40
    assert recorded_users(state_url) == created
    sandbox.scim.clear_faults()
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    # No create answered 409 and no adoption: the store knew every user the failed run had made.
    assert sandbox.scim.total("POST") - sum(n for k, n in sandbox.scim.requests.items() if k == "POST /Groups") == (
        summary.counts["users_created"]) == len(reference()["users"]) - len(created)
    assert summary.counts.get("users_adopted", 0) == 0
    assert_same_state(atlassian_state(sandbox), reference())


def test_a_400_is_shown_to_the_operator_and_the_other_writes_land(sandbox, state_url, sync, reference):
    detail = "Invalid email address format for emails[0].value"
    fault = sandbox.scim.inject(Fault("POST", POST_USERS, 400, times=1, body=scim_error(400, detail, "invalidValue")))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 1, summary
    assert fault.times == 0
    assert len(summary.failures) == 1
    failure = summary.failures[0]
    assert detail in failure and "400" in failure and "invalidValue" in failure
    assert any(detail in line for line in summary.lines())  # in the printed summary
    expected = reference()
    partial = atlassian_state(sandbox)
    refused = set(expected["users"]) - set(partial["users"])
    assert len(refused) == 1 and set(partial["users"]) <= set(expected["users"])
    refused_name = refused.pop()
    assert refused_name in failure  # the failure names the user
    assert set(partial["groups"]) == set(expected["groups"])  # the groups and the other memberships landed
    for name, (_, members) in expected["groups"].items():
        assert partial["groups"][name][1] == members - {refused_name}, name
    status, summary = sync(sandbox.settings(state_url))  # fixed in Atlassian: the next run completes it
    assert status == 0, summary
    assert_same_state(atlassian_state(sandbox), expected)


def test_users_atlassian_refuses_for_their_domain_are_listed_and_the_rest_lands(make_sandbox, state_url, sync, reference):
    """Atlassian has verified only contoso.com: every fabrikam.com user is refused (400), named, and the rest lands."""
    expected = reference()
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED, atlassian_domains=("contoso.com",))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 1, summary
    refused = {name for name in expected["users"] if name.casefold().endswith("@fabrikam.com")}
    assert refused and len(summary.failures) == len(refused)
    for name in refused:
        assert sum(name in line for line in summary.failures) == 1, name
    assert all("not verified" in line and "400" in line for line in summary.failures)
    state = atlassian_state(sandbox)
    assert set(state["users"]) == set(expected["users"]) - refused
    for name, (_, members) in expected["groups"].items():
        assert state["groups"][name][1] == members - refused, name


def test_scim_failing_for_good_mid_load_resumes_on_the_next_run(sandbox, state_url, sync, reference, fast_retries):
    fault = sandbox.scim.inject(Fault("PATCH", r"/Groups/", 503, times=10**6))
    status, exc = sync(sandbox.settings(state_url))
    assert status == 1 and isinstance(exc, TransientError), repr(exc)
    assert "try again later" in str(exc)
    assert fault.times < 10**6
    sandbox.scim.clear_faults()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert_same_state(atlassian_state(sandbox), reference())


def test_a_guard_blocks_before_any_fault_matters(sandbox, state_url, sync):
    """Blocked runs (exit 3) never reach the SCIM edge: a fault there stays unserved."""
    fault = sandbox.scim.inject(Fault("POST", POST_USERS, 500, times=1))
    status, exc = sync(sandbox.settings(state_url, max_group_size=5))
    assert status == 3 and isinstance(exc, GuardsyncBlocked)
    assert fault.times == 1 and scim_writes(sandbox) == 0
