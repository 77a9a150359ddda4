"""The delta dry run reads what the sync's writes would meet (Loader.foresee), and an observing run records what
it saw (Plan.observed_*): histories a review found breaking the first version of each (each failed then)."""

from __future__ import annotations

from guardsync.state import StateStore
from tests.test_brownfield import entra_by_upn, scim_user
from tests.test_flow import expected_upns, groups_by_name, scim_writes
from tests.test_one_planner import _account, _put_by_hand, renamed_onto_a_hand_made_account
from tests.test_safety import _delete


def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def test_an_account_whose_external_id_was_cleared_by_hand_is_not_recorded_twice(sandbox, state_url, sync):
    """A managed account whose externalId Atlassian holds differs from the record (a hand edit through the API;
    or a --full run killed between a hand-over's PUT and its record): the first version recorded the observed
    account under the externalId Atlassian holds; a stray row (Entra id "") then owned the account, and the next
    delta run deactivated the account of a user in scope and enabled. Such an account is left to the plan's write."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    upn = sorted(expected_upns(tenant))[3]
    uid = entra_by_upn(tenant)[upn]
    account = _account(sandbox, upn)
    edited = {k: v for k, v in account.items() if k not in ("id", "meta", "externalId")}
    _put_by_hand(sandbox, account["id"], edited)
    assert sync(settings, full=True)[0] == 0
    recorded = StateStore(state_url).load()
    owners = sorted(u for u, a in recorded.users.items() if a.scim_id == account["id"])
    other = entra_by_upn(tenant)[sorted(expected_upns(tenant))[5]]
    tenant.update_user(other, jobTitle="Anything")  # a delta run with something to do
    status, summary = sync(settings)
    assert status == 0, summary
    held = sandbox.scim.get_user(account["id"])
    after = sorted(u for u, a in StateStore(state_url).load().users.items() if a.scim_id == account["id"])
    assert held["active"] is True, (summary.counts, held)
    assert owners == [uid] and after == [uid], f"account {account['id']} recorded for {owners}, then {after}"


def test_dry_run_and_sync_agree_on_a_disabled_user_whose_account_was_deleted_by_hand(sandbox, state_url, sync):
    """A user in groups is disabled in Entra and its account was deleted by hand: the dry run (foresee) shows
    users_gone 1 and no member removed; the sync's members stage counted the original plan's removals, though the
    account was gone from its groups already (it counts what it sends now)."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    member_of = groups_by_name(sandbox)
    upn = next(u for u in sorted(expected_upns(tenant)) if sum(u in m for m in member_of.values()) >= 1)
    _delete(sandbox, "Users", _account(sandbox, upn)["id"])
    tenant.update_user(entra_by_upn(tenant)[upn], accountEnabled=False)
    sandbox.scim.reset_counts()
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    assert scim_writes(sandbox) == 0
    status, summary = sync(settings)
    assert status == 0, summary
    assert _nonzero(summary.counts) == _nonzero(preview.counts)


def test_dry_run_and_sync_agree_on_a_user_renamed_onto_an_unmanaged_account(sandbox, state_url, sync):
    """test_8 (delta) with a dry run first: the rename's PUT meets 409 in the sync, which adopts the hand-made
    account and releases the old one; the first foresee read no name an update takes, so its dry run showed an
    update. It reads the userName a PUT takes now, as a POST's."""
    settings = renamed_onto_a_hand_made_account(sandbox, state_url, sync)[0]
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    status, summary = sync(settings)
    assert status == 0, summary
    assert _nonzero(summary.counts) == _nonzero(preview.counts)


def test_dry_run_and_sync_agree_on_a_create_whose_external_id_an_unmanaged_account_carries(sandbox, state_url, sync):
    """A newcomer whose Entra id an unmanaged account carries as externalId under another userName: foresee's
    the first foresee's find_account found it by externalId and the dry run showed an adoption; the sync's POST
    succeeds (userName is free, no 409) and creates the account. A POST meets 409 on userName only: foresee reads that."""
    tenant = sandbox.tenant
    settings = sandbox.settings(state_url)
    assert sync(settings)[0] == 0
    upn = "nina.newcomer@contoso.com"
    nina = tenant.add_user(userPrincipalName=upn, mail=upn, givenName="Nina", surname="Newcomer",
                           displayName="Nina Newcomer")
    sandbox.scim.add_user(scim_user("nina.old@contoso.com", display="Nina (old)", external_id=nina))
    status, preview = sync(settings, dry_run=True)
    assert status == 0, preview
    status, summary = sync(settings)
    assert status == 0, summary
    assert _nonzero(summary.counts) == _nonzero(preview.counts)


def test_a_full_read_after_a_hand_over_killed_between_its_put_and_its_record(tmp_path):
    """Pure (no Prefect): a --full run's hand-over PUT landed (the account's externalId is the new user's) and the
    run was killed before store.hand_over. The re-run observes; record_observed saves the observed record under the
    new user's id, and the old user's row still points at the account: two Entra ids share one account. The next
    delta plan deactivates the new user's account (the old user left)."""
    from guardsync.load import Loader
    from guardsync.models import AppliedState, AppliedUser, DesiredUser
    from guardsync.observe import observe
    from guardsync.plan import PlanInputs
    from guardsync.scim import user_resource

    def person(uid: str, name: str, active: bool = True) -> DesiredUser:
        return DesiredUser(external_id=uid, user_name=name, active=active, display_name=name, given_name="",
                           family_name="", title="")

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    old, new = person("old-id", "x@contoso.com"), person("new-id", "x@contoso.com")
    store.save_users("run-1", [("create", "S", old)])
    inputs = PlanInputs({"new-id": new}, {})  # old left Entra, new took its identifier
    atlassian = [{**user_resource(new), "id": "S"}]  # the killed run's PUT landed
    plan = inputs.plan(store.load(), observe(store.load(), atlassian, []))
    assert [c.kind for c in plan.users] == [] and [h.to_id for h in plan.handovers] == ["new-id"]
    Loader(None, store, "run-2", inputs).record_observed(plan)
    recorded = store.load()
    owners = sorted(uid for uid, u in recorded.users.items() if u.scim_id == "S")
    delta = inputs.plan(recorded)
    assert owners == ["old-id"], owners  # the account's externalId is not old-id's: left to the plan's own write
    assert not any(c.kind == "deactivate" and c.scim_id == "S" for c in delta.users)
    assert [(c.scim_id, c.user.external_id, c.handed_from) for c in delta.users] == [("S", "new-id", "old-id")]
