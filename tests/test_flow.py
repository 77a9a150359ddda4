"""The sync-directory flow against the sandbox, one test per contract rule."""

import shutil
from pathlib import Path

from guardsync.errors import GuardsyncBlocked
from guardsync.sandbox.http import Fault

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def user_names(sandbox) -> set[str]:
    return {user["userName"] for user in sandbox.scim.users()}


def groups_by_name(sandbox) -> dict[str, set[str]]:
    """Group name -> userNames of its members, as Atlassian holds them."""
    names = {user["id"]: user["userName"] for user in sandbox.scim.users()}
    return {g["displayName"]: {names[m["value"]] for m in g.get("members") or []} for g in sandbox.scim.groups()}


def expected_upns(tenant, user_ids=None, domains=("contoso.com", "fabrikam.com")):
    """UPNs of the enabled, non-guest users on allowed domains, unique case-insensitively among those in scope."""
    candidates = [
        u for uid, u in tenant.users.items()
        if (user_ids is None or uid in user_ids) and "#EXT#" not in u["userPrincipalName"]
        and u["userPrincipalName"].split("@")[1].casefold() in domains
    ]
    folded = [u["userPrincipalName"].casefold() for u in candidates]
    return {
        u["userPrincipalName"] for u in candidates
        if u["accountEnabled"] and folded.count(u["userPrincipalName"].casefold()) == 1
    }


def group_id(tenant, name):
    return next(gid for gid, g in tenant.groups.items() if g["displayName"] == name)


def transitive_users(tenant, gid, seen=None):
    """The definition, independent of guardsync.flatten: users reached through any nesting."""
    seen = seen if seen is not None else set()
    if gid in seen:
        return set()
    seen.add(gid)
    found = set()
    for member in tenant.members.get(gid, []):
        if member in tenant.users:
            found.add(member)
        elif member in tenant.groups:
            found |= transitive_users(tenant, member, seen)
    return found


def test_full_sync_provisions_exactly_the_users_in_scope(sandbox, state_url, sync):
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert user_names(sandbox) == expected_upns(sandbox.tenant)
    assert summary.counts["users_created"] == len(expected_upns(sandbox.tenant))
    assert summary.excluded["guest"] == 3 and summary.excluded["domain"] == 4
    assert summary.excluded["disabled_never_synced"] == 3
    assert len(sandbox.scim.groups()) == len(sandbox.tenant.groups)


def test_nested_groups_are_flattened_into_each_synced_group(sandbox, state_url, sync):
    status, _ = sync(sandbox.settings(state_url))
    assert status == 0
    in_scope = expected_upns(sandbox.tenant)
    atlassian = groups_by_name(sandbox)
    for gid, group in sandbox.tenant.groups.items():
        want = {sandbox.tenant.users[u]["userPrincipalName"] for u in transitive_users(sandbox.tenant, gid)} & in_scope
        assert atlassian[group["displayName"]] == want, group["displayName"]


def test_pilot_syncs_only_the_named_group_and_its_transitive_members(sandbox, state_url, sync):
    status, summary = sync(sandbox.settings(state_url, groups=["pilot"]))
    assert status == 0
    pilot = group_id(sandbox.tenant, "Pilot")
    assert user_names(sandbox) == expected_upns(sandbox.tenant, transitive_users(sandbox.tenant, pilot))
    assert set(groups_by_name(sandbox)) == {"Pilot"}  # the nested "Pilot Champions" is flattened, not synced
    assert summary.new_groups == ["Pilot"]


def test_domain_filter_and_email_identifier(sandbox, state_url, sync):
    status, _ = sync(sandbox.settings(state_url, domains=["fabrikam.com"], identifier="email"))
    assert status == 0
    synced = user_names(sandbox)
    assert synced and all(name.casefold().endswith("@fabrikam.com") for name in synced)
    mails = {u["mail"] for u in sandbox.tenant.users.values() if u["mail"]}
    assert synced <= mails  # userName is the mail exactly as Entra spells it
    emails = {u["userName"]: u["emails"][0]["value"] for u in sandbox.scim.users()}
    assert all(name == email for name, email in emails.items())


def test_unverified_domain_in_config_is_a_configuration_error(sandbox, state_url, sync):
    status, error = sync(sandbox.settings(state_url, domains=["partner.example"]))
    assert status == 1
    assert "partner.example not verified" in str(error)
    assert scim_writes(sandbox) == 0


def test_quarantine_freezes_duplicates_and_malformed_identifiers(sandbox, state_url, sync):
    status, summary = sync(sandbox.settings(state_url, identifier="email"))
    assert status == 0
    assert summary.quarantined["duplicate_identifier"] == 4  # two twins, each with its original
    assert summary.quarantined["malformed_identifier"] == 1  # mail "not-an-address"
    assert any("not-an-address" in line for line in summary.quarantined_examples)
    synced = {name.casefold() for name in user_names(sandbox)}
    assert "not-an-address" not in synced
    twins = [u["mail"] for u in sandbox.tenant.users.values() if u["mail"] and u["mail"] != u["mail"].lower()
             and u["mail"].casefold() in {m.casefold() for m in (x["mail"] for x in sandbox.tenant.users.values()) if m}]
    assert twins and not any(t.casefold() in synced for t in twins)


def test_group_over_the_cap_blocks_the_run_and_writes_nothing(sandbox, state_url, sync):
    status, error = sync(sandbox.settings(state_url, max_group_size=20))
    assert status == 3
    assert isinstance(error, GuardsyncBlocked)
    assert "group_too_large" in str(error) and "split the group" in str(error).lower()
    assert "Pilot" in str(error)
    assert scim_writes(sandbox) == 0


def test_second_run_makes_zero_writes(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0
    assert scim_writes(sandbox) == 0
    assert not any(summary.counts.values())


def test_dry_run_writes_nothing_and_reports_the_plan(sandbox, state_url, sync, tmp_path):
    status, summary = sync(sandbox.settings(state_url), dry_run=True)
    assert status == 0
    assert scim_writes(sandbox) == 0
    assert summary.mode == "dry-run"
    assert summary.counts["users_created"] == len(expected_upns(sandbox.tenant))
    from guardsync.state import StateStore

    assert StateStore(state_url).history() == []  # nothing in the state either


def test_adoption_takes_over_existing_objects_and_leaves_others_alone(sandbox, state_url, sync):
    alice = sorted(expected_upns(sandbox.tenant))[0]
    existing = sandbox.scim.add_user({"userName": alice.upper(), "emails": [{"value": alice, "primary": True}],
                                      "displayName": "Made by hand", "active": True})
    stranger = sandbox.scim.add_user({"userName": "stranger@contoso.com", "emails": [{"value": "stranger@contoso.com", "primary": True}],
                                      "displayName": "Not from Entra", "active": True})
    sandbox.scim.add_group("pilot", [stranger["id"]])  # same name, other case, with a member Entra does not have
    sandbox.scim.add_group("Hand-made group", [stranger["id"]])
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert summary.counts["users_adopted"] == 1 and summary.counts["groups_adopted"] == 1
    users = {u["userName"].casefold(): u for u in sandbox.scim.users()}
    assert len(users) == len(sandbox.scim.users())  # no duplicate userName
    assert users[alice.casefold()]["id"] == existing["id"]
    assert users[alice.casefold()]["displayName"] != "Made by hand"
    assert users["stranger@contoso.com"]["displayName"] == "Not from Entra" and users["stranger@contoso.com"]["active"]
    groups = groups_by_name(sandbox)
    assert "stranger@contoso.com" not in groups["pilot"]  # an adopted group's members become exactly ours
    assert groups["Hand-made group"] == {"stranger@contoso.com"}


def test_changes_between_runs(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    upns = sorted(expected_upns(tenant))
    by_upn = {u["userPrincipalName"]: uid for uid, u in tenant.users.items()}
    disabled, renamed = by_upn[upns[0]], by_upn[upns[1]]
    tenant.update_user(disabled, accountEnabled=False)
    local, domain = upns[1].split("@")
    tenant.update_user(renamed, userPrincipalName=f"{local}.new@{domain}", mail=f"{local}.new@{domain}")
    gid = group_id(tenant, "Pilot Champions")
    tenant.rename_group(gid, "Champions")
    before_ids = {u["userName"]: u["id"] for u in sandbox.scim.users()}
    champions_before = groups_by_name(sandbox)["Pilot Champions"]

    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    users = {u["userName"]: u for u in sandbox.scim.users()}
    assert users[upns[0]]["active"] is False
    assert users[f"{local}.new@{domain}"]["id"] == before_ids[upns[1]]  # same account, new userName
    groups = groups_by_name(sandbox)
    assert "Pilot Champions" not in groups and groups["Champions"] == champions_before - {upns[0]}
    assert summary.counts["users_deactivated"] == 1 and summary.counts["groups_renamed"] == 1
    assert summary.renamed_groups == ["Champions"]


def test_graph_and_scim_throttling_are_honoured(sandbox, state_url, sync):
    sandbox.graph.inject(Fault("GET", r"/v1.0/users", status=429, headers={"Retry-After": "1"}, times=2))
    sandbox.scim.inject(Fault("POST", r"/Users", status=429, headers={"Retry-After": "1"}, times=3))
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert user_names(sandbox) == expected_upns(sandbox.tenant)
    assert sandbox.scim.total("POST") >= len(expected_upns(sandbox.tenant)) + 3


def test_expired_scim_key_fails_with_advice(sandbox, state_url, sync, monkeypatch):
    monkeypatch.setenv("GUARDSYNC_SANDBOX_SCIM_API_KEY", "expired-key")
    status, error = sync(sandbox.settings(state_url))
    assert status == 1
    assert "one year" in str(error) and "expired-key" not in str(error)


def test_broken_suite_is_a_failure_not_a_pass(sandbox, state_url, sync, tmp_path, monkeypatch):
    suites = tmp_path / "expectations"
    shutil.copytree(Path(__file__).parent.parent / "expectations", suites)
    text = (suites / "users.json").read_text().replace('"identifier_key"', '"no_such_column"', 1)
    (suites / "users.json").write_text(text)
    monkeypatch.setenv("GUARDSYNC_EXPECTATIONS", str(suites))
    status, error = sync(sandbox.settings(state_url))
    assert status == 1 and not isinstance(error, GuardsyncBlocked)
    assert "users" in str(error)
    assert scim_writes(sandbox) == 0


def test_state_store_of_another_directory_blocks(sandbox, make_sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    other = make_sandbox(seed=99)
    status, error = sync(other.settings(state_url))
    assert status == 3 and "state_binding" in str(error)
    assert scim_writes(other) == 0


def test_postgresql_state_store(sandbox, sync):
    import sqlalchemy

    admin = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    name = "guardsync_test_flow"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        assert sync(sandbox.settings(url))[0] == 0
        sandbox.scim.reset_counts()
        assert sync(sandbox.settings(url))[0] == 0
        assert scim_writes(sandbox) == 0
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def test_a_retried_flow_run_reruns_the_failed_load_not_the_extract(sandbox, state_url, prefect_server):
    from flows.sync_directory import sync_directory

    # A non-transient failure (a 401 on the first membership PATCH) fails the load-memberships task;
    # the flow's own retry must find extract..load-groups cached and redo only the memberships.
    sandbox.scim.inject(Fault("PATCH", r"/Groups/", status=401, times=1,
                              body='{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401"}'))
    result = sync_directory.with_options(retries=1, retry_delay_seconds=0)(settings=sandbox.settings(state_url))
    assert result["status"] == "completed"
    graph_requests_one_run = sandbox.graph.total()
    assert groups_by_name(sandbox)["Pilot"]  # memberships landed on the retry
    sandbox.graph.reset_counts()
    sandbox.scim.reset_counts()
    sync_directory(settings=sandbox.settings(state_url), full=True)  # a fresh full read, for comparison
    assert graph_requests_one_run == sandbox.graph.total()
    assert scim_writes(sandbox) == 0


def test_each_run_leaves_its_artifacts(sandbox, state_url, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.sync_directory import sync_directory

    state = sync_directory(settings=sandbox.settings(state_url), return_state=True)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"summary", "plan", "plan-changes", "gate-results", "load-users", "load-groups", "load-memberships"} <= set(by_key)
    assert "| object | created | updated |" in by_key["summary"].data and "| users |" in by_key["summary"].data
    secret = sandbox.tenant.client_secret
    assert all(secret not in str(a.data) and sandbox.api_key not in str(a.data) for a in artifacts)
