"""Guards, drift, the directory lock, audit and history: the run is safe before it is fast."""

from guardsync.cli import main
from guardsync.errors import GuardsyncBlocked
from guardsync.sandbox.stack import to_toml
from guardsync.state import DirectoryBusy, StateStore

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def scim_writes(sandbox) -> int:
    return sum(sandbox.scim.total(method) for method in WRITES)


def active_users(sandbox) -> dict[str, bool]:
    return {u["userName"]: u["active"] for u in sandbox.scim.users()}


def test_mass_deactivation_is_blocked_then_allowed_once(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    pilot_only = sandbox.settings(state_url, groups=["Pilot"])  # most users would leave scope
    sandbox.scim.reset_counts()
    status, error = sync(pilot_only)
    assert status == 3 and isinstance(error, GuardsyncBlocked)
    assert "max_deactivations" in str(error) and "--allow-mass-deactivation" in str(error)
    assert scim_writes(sandbox) == 0
    status, summary = sync(pilot_only, allow_mass_deactivation=True)
    assert status == 0
    assert summary.counts["users_deactivated"] > 10
    assert summary.counts["groups_deleted"] == len(sandbox.tenant.groups) - 1


def test_count_limit_allows_a_small_change(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url))[0] == 0
    synced = set(active_users(sandbox))
    enabled = [uid for uid, u in sandbox.tenant.users.items() if u["userPrincipalName"] in synced]
    for uid in enabled[:2]:
        sandbox.tenant.update_user(uid, accountEnabled=False)
    assert sync(sandbox.settings(state_url, max_deactivations=1))[0] == 3
    status, summary = sync(sandbox.settings(state_url, max_deactivations=5))
    assert status == 0 and summary.counts["users_deactivated"] == 2


def test_an_empty_read_never_deprovisions(sandbox, state_url, sync):
    assert sync(sandbox.settings(state_url, groups=["Pilot"]))[0] == 0
    pilot = next(gid for gid, g in sandbox.tenant.groups.items() if g["displayName"] == "Pilot")
    for member in list(sandbox.tenant.members[pilot]):
        sandbox.tenant.remove_member(pilot, member)
    sandbox.scim.reset_counts()
    status, error = sync(sandbox.settings(state_url, groups=["Pilot"], max_deactivations="100%"))
    assert status == 3 and "empty_scope" in str(error)
    assert scim_writes(sandbox) == 0
    assert all(active_users(sandbox).values())


def test_drift_is_reported_and_restored_and_unmanaged_objects_stay(sandbox, state_url, sync):
    stranger = sandbox.scim.add_user({"userName": "hand.made@contoso.com", "displayName": "Hand Made", "active": True,
                                      "emails": [{"value": "hand.made@contoso.com", "primary": True}]})
    assert sync(sandbox.settings(state_url))[0] == 0
    users = {u["userName"]: u for u in sandbox.scim.users()}
    groups = {g["displayName"]: g for g in sandbox.scim.groups()}
    victim = next(name for name in sorted(users) if name != "hand.made@contoso.com")
    edited = dict(users[victim], displayName="Edited By Hand", active=False)
    edited.pop("meta", None)
    _put(sandbox, "Users", edited)
    deleted_group = "Pilot Champions"
    _delete(sandbox, "Groups", groups[deleted_group]["id"])
    pilot = groups["Pilot"]
    _patch_add(sandbox, pilot["id"], stranger["id"])

    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))  # a delta run does not look at Atlassian
    assert status == 0 and not summary.drift and scim_writes(sandbox) == 0
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0, summary
    assert any("changed by hand" in line and victim in line for line in summary.drift)
    assert any("deleted by hand" in line and deleted_group in line for line in summary.drift)
    after = {u["userName"]: u for u in sandbox.scim.users()}
    assert after[victim]["active"] is True and after[victim]["displayName"] != "Edited By Hand"
    groups_after = {g["displayName"]: g for g in sandbox.scim.groups()}
    assert deleted_group in groups_after
    pilot_members = {m["value"] for m in groups_after["Pilot"].get("members") or []}
    assert stranger["id"] not in pilot_members
    assert after["hand.made@contoso.com"]["displayName"] == "Hand Made"  # unmanaged: untouched
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url))[0] == 0
    assert scim_writes(sandbox) == 0


def test_a_second_run_of_the_same_directory_is_refused(sandbox, state_url, sync):
    holder = StateStore(state_url)
    holder.acquire_lock("another-run")  # held by this live process: not stale
    status, error = sync(sandbox.settings(state_url))
    assert status == 1 and isinstance(error, DirectoryBusy) and "another-run" in str(error)
    assert scim_writes(sandbox) == 0
    holder.release_lock("another-run")
    assert sync(sandbox.settings(state_url))[0] == 0


def test_history_and_audit_commands(sandbox, state_url, sync, tmp_path, capsys):
    assert sync(sandbox.settings(state_url))[0] == 0
    synced = set(active_users(sandbox))
    uid, user = next((uid, u) for uid, u in sandbox.tenant.users.items() if u["userPrincipalName"] in synced)
    sandbox.tenant.update_user(uid, accountEnabled=False)
    assert sync(sandbox.settings(state_url))[0] == 0
    config = tmp_path / "guardsync.toml"
    config.write_text(to_toml(sandbox.config(state_url)))
    capsys.readouterr()
    assert main(["history", "--config", str(config)]) == 0
    history = capsys.readouterr().out.splitlines()
    assert len(history) == 2 and all("completed" in line for line in history)
    assert "users_deactivated 1" in history[0]
    assert main(["audit", user["userPrincipalName"], "--config", str(config)]) == 0
    audit = capsys.readouterr().out
    assert "create" in audit and "deactivate" in audit and "members" in audit


def _put(sandbox, kind, resource):
    import requests

    response = requests.put(f"{sandbox.scim.scim_url}/{kind}/{resource['id']}", json=resource,
                            headers={"Authorization": f"Bearer {sandbox.api_key}"}, verify=str(sandbox.ca.ca_file))
    assert response.status_code == 200, response.text


def _delete(sandbox, kind, scim_id):
    import requests

    response = requests.delete(f"{sandbox.scim.scim_url}/{kind}/{scim_id}",
                               headers={"Authorization": f"Bearer {sandbox.api_key}"}, verify=str(sandbox.ca.ca_file))
    assert response.status_code == 204, response.text


def _patch_add(sandbox, group_id, user_id):
    import requests

    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": user_id}]}]}
    response = requests.patch(f"{sandbox.scim.scim_url}/Groups/{group_id}", json=body,
                              headers={"Authorization": f"Bearer {sandbox.api_key}"}, verify=str(sandbox.ca.ca_file))
    assert response.status_code in (200, 204), response.text
