"""Incremental runs: Graph delta rounds merged into the stored snapshot, per the contract."""

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def graph_data_requests(sandbox) -> dict[str, int]:
    """Graph requests beyond the login (discovery and token) ones."""
    return {k: v for k, v in sandbox.graph.requests.items() if "/v1.0/" in k}


def stored_links(state_url: str) -> dict:
    from guardsync.state import StateStore

    store = StateStore(state_url)
    try:
        return store.load_mirror()[1]
    finally:
        store.dispose()


def members_by_group(sandbox) -> dict[str, set[str]]:
    names = {user["id"]: user["userName"] for user in sandbox.scim.users()}
    return {g["displayName"]: {names[m["value"]] for m in g.get("members") or []} for g in sandbox.scim.groups()}


def test_no_change_run_reads_a_handful_of_pages_and_writes_nothing(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=2500, groups=60)
    assert sync(sandbox.settings(state_url))[0] == 0
    links_before = stored_links(state_url)
    sandbox.graph.reset_counts()
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0
    assert stored_links(state_url) != links_before  # Graph's new links are kept, as Graph asks
    assert graph_data_requests(sandbox) == {
        "GET /v1.0/organization": 1, "GET /v1.0/domains": 1, "GET /v1.0/users/delta": 1, "GET /v1.0/groups/delta": 1,
    }
    assert sandbox.scim.total() == 0  # not even a read: a delta run does not look at Atlassian
    assert not any(summary.counts.values())
    # Nothing changed since a completed run with these settings: the run stops after the read.
    assert summary.message.startswith("no change in Entra"), summary
    assert not summary.excluded, "scope ran: the run did not stop after the read"
    # That run kept only Graph's new delta links; the next change in Entra arrives through them.
    synced = {u["userName"] for u in sandbox.scim.users()}
    uid = next(uid for uid, u in sandbox.tenant.users.items() if u["userPrincipalName"] in synced)
    sandbox.tenant.update_user(uid, jobTitle="Chief Delta Officer")
    sandbox.graph.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0 and summary.counts["users_updated"] == 1, summary
    assert sandbox.graph.requests["GET /v1.0/users/delta"] == 1


def test_a_settings_change_is_applied_even_when_entra_did_not_change(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=300, groups=20)
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    users_before = len(sandbox.scim.users())
    pilot_only = settings.model_copy(update={"sync": settings.sync.model_copy(update={"groups": ["Pilot"]})})
    status, summary = sync(pilot_only, allow_mass_deactivation=True)
    assert status == 0, summary
    assert not summary.message, "a run with new settings must reconcile, not stop after the read"
    assert summary.counts["users_deactivated"] > 0
    assert sum(1 for u in sandbox.scim.users() if u["active"]) < users_before


def test_a_handful_of_changes_costs_a_handful_of_writes(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=2500, groups=60)
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    before = members_by_group(sandbox)
    synced = {u["userName"] for u in sandbox.scim.users()}
    ids = [uid for uid, u in tenant.users.items() if u["userPrincipalName"] in synced]
    tenant.update_user(ids[0], jobTitle="Chief Sync Officer")
    tenant.update_user(ids[1], accountEnabled=False)
    new = tenant.add_user(userPrincipalName="new.person@contoso.com", mail="new.person@contoso.com",
                          displayName="New Person", givenName="New", surname="Person", jobTitle="Analyst",
                          accountEnabled=True, userType="Member")
    pilot = next(gid for gid, g in tenant.groups.items() if g["displayName"] == "Pilot")
    tenant.add_member(pilot, new)
    sandbox.graph.reset_counts()
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert summary.counts["users_updated"] == 1 and summary.counts["users_deactivated"] == 1
    assert summary.counts["users_created"] == 1
    assert sum(graph_data_requests(sandbox).values()) == 4
    # one write per changed user, one PATCH per group whose members changed
    after = members_by_group(sandbox)
    changed_groups = sum(1 for name in after if after[name] != before.get(name))
    assert sandbox.scim.total("POST") == 1 and sandbox.scim.total("PUT") == 2
    assert sandbox.scim.total("PATCH") == changed_groups > 0
    assert scim_writes(sandbox) == 3 + changed_groups
    assert "new.person@contoso.com" in after["Pilot"]


def test_a_change_deep_in_nested_groups_reaches_every_group_above(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    # the deepest group of a nesting chain: a group that holds no group but is held by one
    nested_in = {m: g for g, members in tenant.members.items() for m in members if m in tenant.groups}
    leaf = next(g for g in nested_in if not any(m in tenant.groups for m in tenant.members[g]) and nested_in[g] != g)
    ancestors, node = [], leaf
    while node in nested_in and nested_in[node] not in ancestors and nested_in[node] != node:
        node = nested_in[node]
        ancestors.append(node)
    new = tenant.add_user(userPrincipalName="deep.joiner@fabrikam.com", mail="deep.joiner@fabrikam.com",
                          displayName="Deep Joiner", givenName="Deep", surname="Joiner", jobTitle="",
                          accountEnabled=True, userType="Member")
    tenant.add_member(leaf, new)
    assert sync(sandbox.settings(state_url))[0] == 0
    groups = members_by_group(sandbox)
    for gid in [leaf, *ancestors]:
        assert "deep.joiner@fabrikam.com" in groups[tenant.groups[gid]["displayName"]]


def test_expired_delta_link_resyncs_in_full_and_writes_only_what_differs(sandbox, state_url, sync):
    tenant = sandbox.tenant
    assert sync(sandbox.settings(state_url))[0] == 0
    synced = {u["userName"] for u in sandbox.scim.users()}
    uid = next(uid for uid, u in tenant.users.items() if u["userPrincipalName"] in synced)
    tenant.update_user(uid, displayName="Renamed Display")
    sandbox.graph.expire_delta_links()
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0
    assert summary.counts["users_updated"] == 1
    assert scim_writes(sandbox) == 1  # the full resync found one difference, and the drift read found none


def test_full_flag_and_periodic_full_read(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url))[0] == 0
    assert sandbox.scim.total("GET") == 0  # a delta run: Atlassian is not read
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and sandbox.scim.total("GET") > 0  # a full read also checks Atlassian for drift
    first_full = summary.last_full_read
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url, full_read_every_hours=0.0001))  # due again already
    assert status == 0 and sandbox.scim.total("GET") > 0 and summary.last_full_read >= first_full
    assert scim_writes(sandbox) == 0


def test_an_edited_gate_or_a_new_guardsync_is_applied_even_when_entra_did_not_change(make_sandbox, state_url, sync,
                                                                                      tmp_path, monkeypatch):
    """The README has operators change a gate by editing expectations/*.json: the next run must apply it,
    not stop after the read because Entra did not change. So must a run of an upgraded guardsync."""
    import json
    import shutil

    import guardsync.run
    from guardsync.gates import DEFAULT_EXPECTATIONS_DIR

    suites = tmp_path / "expectations"
    shutil.copytree(DEFAULT_EXPECTATIONS_DIR, suites)
    monkeypatch.setenv("GUARDSYNC_EXPECTATIONS", str(suites))
    sandbox = make_sandbox(users=200, groups=12)
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    status, summary = sync(settings)
    assert status == 0 and summary.message.startswith("no change in Entra"), summary  # settled

    users = json.loads((suites / "users.json").read_text())
    users["meta"]["description"] += " Edited by the admins."
    (suites / "users.json").write_text(json.dumps(users))
    status, summary = sync(settings)
    assert status == 0 and not summary.message, "an edited gate must be applied, not skipped over"
    assert summary.excluded, "scope and the gates ran"
    assert sync(settings)[1].message.startswith("no change in Entra")  # settled again under the edited gate

    monkeypatch.setattr(guardsync.run, "guardsync_version", lambda: "99.0.0")
    status, summary = sync(settings)
    assert status == 0 and not summary.message, "a new guardsync version must reconcile once"


def test_an_extract_kept_from_before_never_goes_back_over_a_newer_mirror(tmp_path):
    """A retried run's cached extract was read from generation N; once a later run saved N+1, saving it is refused."""
    import pandas as pd

    from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, Snapshot
    from guardsync.state import StateStore

    def snapshot(title: str) -> Snapshot:
        users = pd.DataFrame([["u1", "ada@contoso.com", "ada@contoso.com", "Ada", "Ada", "L", title, True, "Member"]],
                             columns=USER_COLUMNS)
        return Snapshot("t1", "Contoso", users, pd.DataFrame(columns=GROUP_COLUMNS), pd.DataFrame(columns=EDGE_COLUMNS),
                        ["contoso.com"], None)

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        start = store.load_mirror().generation
        assert store.save_mirror(snapshot("old"), {"users": "link-A"}, True, based_on=start)  # run A's extract
        newer = store.load_mirror().generation
        assert store.save_mirror(snapshot("new"), {"users": "link-B"}, False, based_on=newer)  # run B, later
        assert not store.save_mirror(snapshot("old"), {"users": "link-A"}, True, based_on=newer - 1)  # A's retry
        assert not store.save_links({"users": "link-A"}, based_on=newer - 1)
        mirror = store.load_mirror()
        assert mirror.links == {"users": "link-B"} and mirror.snapshot.users["jobTitle"].tolist() == ["new"]
    finally:
        store.dispose()
