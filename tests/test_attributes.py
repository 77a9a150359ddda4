"""Attributes (DESIGN.md "Attributes"): the default mapping is Atlassian's own Entra sync, [attributes]
maps one's own; every test but the pure ones runs through the real sandbox (Graph emulator, scim2-server)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardsync.cli import main
from guardsync.config import parse_settings
from guardsync.errors import ConfigError
from guardsync.models import DesiredUser
from guardsync.sandbox.stack import to_toml
from guardsync.scim import ENTERPRISE_USER, user_from_resource, user_resource
from guardsync.state import StateStore
from tests.test_incremental import graph_data_requests, scim_writes
from tests.test_onboarding import checklist

LANGUAGE_TAG_REFUSED = ("English", "en_US")  # what the generated tenant's bad records carry


def settings_with(sandbox, state_url, **attributes):
    config = sandbox.config(state_url)
    config["attributes"] = attributes
    return parse_settings(config, source="sandbox")


def first(values):
    return values[0] if values else None


def expected_default(user: dict) -> dict:
    """What the default mapping sends of an Entra user, worked out from the tenant alone."""
    language = user.get("preferredLanguage")
    return {
        "display_name": user.get("displayName") or "", "given_name": user.get("givenName") or "",
        "family_name": user.get("surname") or "", "title": user.get("jobTitle") or "",
        "preferred_language": "" if language in LANGUAGE_TAG_REFUSED else language or "",
        "phone_work": first(user.get("businessPhones")) or "", "phone_mobile": user.get("mobilePhone") or "",
        "department": user.get("department") or "", "organization": "", "timezone": "", "nick_name": "",
    }


def atlassian_by_entra_id(sandbox) -> dict[str, dict]:
    return {u["externalId"]: user_from_resource(u) for u in sandbox.scim.users()}


# -- pure: one conversion, both ways ---------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(str.strip)


@given(st.builds(DesiredUser, external_id=st.uuids().map(str), user_name=st.just("a.b@contoso.com"),
                 display_name=text, given_name=text, family_name=text, title=text, active=st.booleans(),
                 preferred_language=text, timezone=text, nick_name=text, department=text, organization=text,
                 phone_work=text, phone_mobile=text))
def test_user_from_resource_inverts_user_resource(user):
    resource = user_resource(user)
    assert user_from_resource(resource) == asdict(user)
    assert all(value != "" for value in resource.values())  # nothing is sent as ""
    if ENTERPRISE_USER in resource:
        assert set(resource[ENTERPRISE_USER]) <= {"department", "organization"}  # all Atlassian keeps there
        assert ENTERPRISE_USER in resource["schemas"]
    assert all(set(p) == {"value", "type"} and p["type"] in ("work", "mobile") for p in resource.get("phoneNumbers", []))


def test_a_record_stored_before_attributes_loads_with_empty_ones(state_url):
    store = StateStore(state_url)
    old = {"external_id": "e1", "user_name": "a@contoso.com", "display_name": "A", "given_name": "", "family_name": "",
           "title": "", "active": True}  # a row as guardsync wrote it before [attributes]
    store.save_users("r1", [("create", "s1", DesiredUser(**old))])
    with store.engine.begin() as conn:
        conn.execute(store_users_table().update().values(record=json.dumps(old)))
    [loaded] = store.load().users.values()
    store.dispose()
    assert loaded.record == DesiredUser(**old) and loaded.record.department == "" and loaded.record.phone_mobile == ""


def store_users_table():
    from guardsync.state import users

    return users


@pytest.mark.parametrize("attributes,says", [
    ({"titel": "jobTitle"}, "[attributes] titel: unknown key; did you mean 'title'?"),
    ({"phoneNumbers": {"fax": "faxNumber"}}, "[attributes] phoneNumbers.fax: unknown key; did you mean 'phoneNumbers.work'?"),
    ({"displayName": ""}, "[attributes] displayName: displayName cannot be turned off"),
    ({"nickName": "onPremisesExtensionAttributes.extensionAttribute16"}, "is not an Entra source"),
    ({"nickName": "preferredName"}, "only when reading one user"),
])
def test_bad_attributes_are_one_configuration_line(attributes, says):
    config = {"entra": {"tenant_id": "t", "client_id": "c", "client_secret": "env:S"},
              "atlassian": {"scim_url": "https://x.example", "api_key": "env:K"}, "attributes": attributes}
    with pytest.raises(ConfigError) as error:
        parse_settings(config)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_nested_and_dotted_keys_mean_the_same():
    base = {"entra": {"tenant_id": "t", "client_id": "c", "client_secret": "env:S"},
            "atlassian": {"scim_url": "https://x.example", "api_key": "env:K"}}
    dotted = parse_settings({**base, "attributes": {"phoneNumbers.mobile": "", "organization": "companyName"}})
    nested = parse_settings({**base, "attributes": {"phoneNumbers": {"mobile": ""}, "organization": "companyName"}})
    assert dotted == nested and "phone_mobile" not in dotted.attributes.mapping()
    assert dotted.attributes.mapping()["organization"] == "companyName"
    # The flow's parameters: dumped as Prefect stores them, validated back to the same settings.
    assert type(dotted).model_validate(dotted.model_dump(mode="json")) == dotted


# -- through the sandbox -----------------------------------------------------------------------------


def test_default_mapping_round_trips_every_attribute(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=150, groups=10)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    held = atlassian_by_entra_id(sandbox)
    assert len(held) > 100
    for entra_id, fields in held.items():
        expected = expected_default(sandbox.tenant.users[entra_id])
        assert {key: fields[key] for key in expected} == expected, entra_id
    # Every attribute of the mapping was exercised, set and unset.
    for field in ("preferred_language", "phone_work", "phone_mobile", "department", "title"):
        assert {bool(f[field]) for f in held.values()} == {True, False}, field
    raw = next(u for u in sandbox.scim.users() if user_from_resource(u)["department"])
    assert raw[ENTERPRISE_USER]["department"] and ENTERPRISE_USER in raw["schemas"]
    assert status == 0 and sync(sandbox.settings(state_url))[1].counts.get("users_updated", 0) == 0


def test_a_cleared_mobile_phone_and_a_department_change_cost_one_write_each(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=150, groups=10)
    assert sync(sandbox.settings(state_url))[0] == 0
    held = atlassian_by_entra_id(sandbox)
    with_mobile = next(uid for uid, f in held.items() if f["phone_mobile"] and f["phone_work"])
    other = next(uid for uid, f in held.items() if uid != with_mobile and f["department"] != "Research")

    sandbox.tenant.update_user(with_mobile, mobilePhone=None)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    assert sandbox.scim.requests == {"PUT /Users/{id}": 1}, sandbox.scim.requests
    after = atlassian_by_entra_id(sandbox)[with_mobile]
    assert after["phone_mobile"] == "" and after["phone_work"] == held[with_mobile]["phone_work"]
    [raw] = [u for u in sandbox.scim.users() if u["externalId"] == with_mobile]
    assert [p["type"] for p in raw["phoneNumbers"]] == ["work"]  # PUT cleared the mobile number

    sandbox.tenant.update_user(other, department="Research")
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0 and summary.counts["users_updated"] == 1, summary
    assert sandbox.scim.requests == {"PUT /Users/{id}": 1}, sandbox.scim.requests
    assert atlassian_by_entra_id(sandbox)[other]["department"] == "Research"


def test_a_mapping_change_writes_each_changed_user_once_then_nothing(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=150, groups=10)
    tenant = sandbox.tenant
    cost_center = tenant.extension_properties[0]
    for uid in list(tenant.users)[:5]:  # users whose values the new mapping leaves as they are
        tenant.update_user(uid, companyName=None, department=None, mobilePhone=None, **{cost_center: None},
                           onPremisesExtensionAttributes={"extensionAttribute1": "E1"})
    assert sync(sandbox.settings(state_url))[0] == 0
    before = atlassian_by_entra_id(sandbox)
    mapping = {"organization": "companyName", "nickName": "onPremisesExtensionAttributes.extensionAttribute3",
               "department": cost_center, "phoneNumbers.mobile": ""}
    expected = {}
    for uid, fields in before.items():
        user = tenant.users[uid]
        expected[uid] = {**fields, "organization": user.get("companyName") or "",
                         "nick_name": user["onPremisesExtensionAttributes"].get("extensionAttribute3") or "",
                         "department": user.get(cost_center) or "", "phone_mobile": ""}
    changed = {uid for uid in before if expected[uid] != before[uid]}
    assert 0 < len(changed) < len(before)  # some users keep every value: they must not be written

    sandbox.scim.reset_counts()
    sandbox.graph.reset_counts()
    settings = settings_with(sandbox, state_url, **mapping)
    status, summary = sync(settings)
    assert status == 0, summary
    assert summary.counts["users_updated"] == len(changed), summary
    writes = {k: v for k, v in sandbox.scim.requests.items() if not k.startswith("GET")}
    assert writes == {"PUT /Users/{id}": len(changed)}, writes  # one write per changed user, nothing else
    # The stored snapshot lacked the newly mapped properties: the run read them in full.
    assert sandbox.graph.requests["GET /v1.0/users"] >= 1
    assert atlassian_by_entra_id(sandbox) == expected

    sandbox.scim.reset_counts()
    sandbox.graph.reset_counts()
    status, summary = sync(settings)
    assert status == 0 and not any(summary.counts.values()), summary
    assert sandbox.scim.total() == 0
    assert sum(graph_data_requests(sandbox).values()) == 4  # organization, domains, one page of each delta
    # The delta links select the new sources: a change of one reaches Atlassian.
    uid = next(iter(before))
    tenant.update_user(uid, companyName="Northwind")
    status, summary = sync(settings)
    assert status == 0 and summary.counts["users_updated"] == 1
    assert atlassian_by_entra_id(sandbox)[uid]["organization"] == "Northwind"


def test_refused_values_are_left_out_and_counted(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=150, groups=10)
    tenant = sandbox.tenant
    time_zone = tenant.extension_properties[1]
    status, summary = sync(settings_with(sandbox, state_url, timezone=time_zone))
    assert status == 0, summary
    assert summary.values_left_out == {"preferredLanguage": 2, "timezone": 1}, summary
    assert any("values left out" in line and "preferredLanguage 2" in line for line in summary.lines())
    held = atlassian_by_entra_id(sandbox)
    refused_language = [uid for uid, u in tenant.users.items() if u.get("preferredLanguage") in LANGUAGE_TAG_REFUSED]
    refused_zone = [uid for uid, u in tenant.users.items() if u.get(time_zone) == "CET+1"]
    for uid in refused_language + refused_zone:
        assert uid in held  # the user syncs ...
    assert all(held[uid]["preferred_language"] == "" for uid in refused_language)  # ... without the value
    assert all(held[uid]["timezone"] == "" for uid in refused_zone)
    assert {held[uid]["timezone"] for uid in held} >= {"Europe/Berlin", ""}
    assert not summary.quarantined.get("invalid_timezone") and not summary.quarantined.get("invalid_preferred_language")


def test_a_value_changed_by_hand_in_atlassian_is_restored_on_a_full_read(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=120, groups=10)
    assert sync(sandbox.settings(state_url))[0] == 0
    uid, fields = next((uid, f) for uid, f in atlassian_by_entra_id(sandbox).items() if f["department"])
    [raw] = [u for u in sandbox.scim.users() if u["externalId"] == uid]
    from guardsync.scim import ScimClient

    hand_edited = DesiredUser(**{**fields, "external_id": uid, "department": "Edited By Hand"})
    ScimClient(sandbox.scim.scim_url, sandbox.api_key).replace_user(raw["id"], hand_edited)
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and summary.counts["users_updated"] == 1, summary
    assert any("users changed by hand: 1" in line for line in summary.drift), summary.drift
    assert atlassian_by_entra_id(sandbox)[uid]["department"] == fields["department"]


def test_upgrade_from_a_store_without_attributes_writes_each_user_with_new_values_once(make_sandbox, state_url, sync):
    """A store written before [attributes]: records without the new fields, a mirror without their
    properties. The first run reads Entra in full and writes each user whose new attributes are not
    all empty, once; the next writes nothing."""
    sandbox = make_sandbox(users=150, groups=10)
    for uid in list(sandbox.tenant.users)[:5]:  # users without any of the new values: not written
        sandbox.tenant.update_user(uid, preferredLanguage=None, businessPhones=[], mobilePhone=None, department=None)
    before_upgrade = {"preferredLanguage": "", "phoneNumbers.work": "", "phoneNumbers.mobile": "", "department": ""}
    assert sync(settings_with(sandbox, state_url, **before_upgrade))[0] == 0
    store = StateStore(state_url)
    with store.engine.begin() as conn:
        users = store_users_table()
        for row in conn.execute(users.select()).all():
            record = {k: v for k, v in json.loads(row.record).items() if k in
                      ("external_id", "user_name", "display_name", "given_name", "family_name", "title", "active")}
            conn.execute(users.update().where(users.c.external_id == row.external_id).values(record=json.dumps(record)))
    snapshot = store.load_mirror().snapshot
    store.dispose()
    assert "department" not in snapshot.users.columns  # the old mirror lacks the new properties
    held = atlassian_by_entra_id(sandbox)
    new_fields = ("preferred_language", "phone_work", "phone_mobile", "department")
    with_values = {uid for uid in held if any(expected_default(sandbox.tenant.users[uid])[f] for f in new_fields)}
    assert 0 < len(with_values) < len(held)

    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    writes = {k: v for k, v in sandbox.scim.requests.items() if not k.startswith("GET")}
    assert writes == {"PUT /Users/{id}": len(with_values)}, writes
    assert not summary.drift  # what Atlassian holds is what the old records say: no drift reported
    sandbox.scim.reset_counts()
    assert sync(sandbox.settings(state_url))[0] == 0 and scim_writes(sandbox) == 0


def test_bad_key_and_unknown_source_stop_the_sync_with_one_line_before_any_write(sandbox, state_url, tmp_path,
                                                                                  capsys, prefect_server):
    for attributes, says in (({"titel": "jobTitle"}, "did you mean 'title'"),
                             ({"organization": "costCentre"}, "Microsoft Graph has no user property 'costCentre'")):
        config = sandbox.config(state_url)
        config["attributes"] = attributes
        path = tmp_path / "guardsync.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        assert main(["sync", "--config", str(path)]) == 1
        err = capsys.readouterr().err.strip()
        ours = [line for line in err.splitlines() if line.startswith("guardsync: ")]  # beside Prefect's own log lines
        assert len(ours) == 1 and says in ours[0], err
        assert sandbox.scim.total() == 0  # not a write, not even a read of Atlassian


def test_check_reports_a_source_graph_does_not_return_or_the_app_cannot_read(sandbox, state_url, tmp_path, capsys):
    config = sandbox.config(state_url)
    path = tmp_path / "guardsync.toml"
    config["attributes"] = {"organization": "companyName", "nickName": "onPremisesExtensionAttributes.extensionAttribute3",
                            "department": sandbox.tenant.extension_properties[0]}
    path.write_text(to_toml(config), encoding="utf-8")
    assert main(["check", "--config", str(path)]) == 0
    status, detail, _ = checklist(capsys.readouterr().out)["attributes"]
    assert status == "PASS" and "organization = companyName" in detail

    config["attributes"] = {"organization": "costCentre", "nickName": "employeeLeaveDateTime", "title": "jobTitle"}
    path.write_text(to_toml(config), encoding="utf-8")
    assert main(["check", "--config", str(path)]) == 1
    items = checklist(capsys.readouterr().out)
    status, detail, fix = items["attributes"]
    assert status == "FAIL"
    assert "organization = 'costCentre': Microsoft Graph has no such user property" in detail
    assert "nickName = 'employeeLeaveDateTime': the app may not read it" in detail
    assert "title" not in detail  # a source Graph returns is not blamed
    assert "extension_<appId>_<name>" in fix and "application permission" in fix
    assert {name for name, (state, _, _) in items.items() if state == "FAIL"} == {"attributes"}


# -- review: a populated directory, mappings of sources the mirror holds, a cleared extension ----------------


def desired_of(tenant, uid: str) -> DesiredUser:
    user = tenant.users[uid]
    return DesiredUser(external_id=uid, user_name=user["userPrincipalName"], active=True, **expected_default(user))


def test_accounts_adopted_with_other_phones_and_department_are_updated_once_then_never(make_sandbox, state_url, sync):
    from tests.test_flow import expected_upns

    sandbox = make_sandbox(users=150, groups=10)
    tenant = sandbox.tenant
    by_upn = {u["userPrincipalName"]: uid for uid, u in tenant.users.items()}
    in_scope = [by_upn[upn] for upn in sorted(expected_upns(tenant))]
    with_values = [uid for uid in in_scope if all(expected_default(tenant.users[uid])[f] for f in ("phone_work", "department"))]
    same, other_phone, other_department, extra = with_values[:4], with_values[4:7], with_values[7:10], with_values[10:12]
    accounts = [user_resource(desired_of(tenant, uid)) for uid in same]  # as Atlassian's own sync left them
    for uid in other_phone:
        accounts.append(user_resource(DesiredUser(**{**asdict(desired_of(tenant, uid)), "phone_work": "+1 555 0100",
                                                     "phone_mobile": "+1 555 0101"})))
    for uid in other_department:
        accounts.append(user_resource(DesiredUser(**{**asdict(desired_of(tenant, uid)), "department": "Old Department",
                                                     "organization": "Old Org"})))
    for uid in extra:  # a third number Atlassian keeps beside the two guardsync sends
        resource = user_resource(desired_of(tenant, uid))
        resource["phoneNumbers"] = [*resource["phoneNumbers"], {"value": "+1 555 0199", "type": "mobile"}] \
            if not desired_of(tenant, uid).phone_mobile else [{"value": "+1 555 0199", "type": "work"}, *resource["phoneNumbers"]]
        accounts.append(resource)
    sandbox.scim.provision(accounts)

    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    changed = len(other_phone) + len(other_department) + len(extra)
    assert sandbox.scim.requests.get("PUT /Users/{id}", 0) == changed, sandbox.scim.requests
    assert summary.counts["users_adopted"] == len(accounts)
    held = atlassian_by_entra_id(sandbox)
    for uid in same + other_phone + other_department + extra:
        assert held[uid] == asdict(desired_of(tenant, uid)), uid
    for uid in extra:
        [raw] = [u for u in sandbox.scim.users() if u["externalId"] == uid]
        assert "+1 555 0199" not in json.dumps(raw)

    for full in (False, True):
        sandbox.scim.reset_counts()
        status, summary = sync(sandbox.settings(state_url), full=full)
        assert status == 0 and scim_writes(sandbox) == 0, (full, summary)


def test_a_mapping_to_a_source_the_mirror_already_holds_updates_on_a_delta_run(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=150, groups=10)
    assert sync(sandbox.settings(state_url))[0] == 0
    before = atlassian_by_entra_id(sandbox)
    sandbox.graph.reset_counts(), sandbox.scim.reset_counts()
    settings = settings_with(sandbox, state_url, organization="department", title="")  # both sources read already
    status, summary = sync(settings)
    assert status == 0, summary
    expected = {uid: {**fields, "organization": fields["department"], "title": ""} for uid, fields in before.items()}
    changed = sum(expected[uid] != before[uid] for uid in before)
    assert 0 < changed and summary.counts["users_updated"] == changed, summary
    assert atlassian_by_entra_id(sandbox) == expected
    sandbox.scim.reset_counts()
    assert sync(settings, full=True)[0] == 0 and scim_writes(sandbox) == 0


def test_a_department_cleared_in_entra_drops_the_enterprise_extension(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=120, groups=10)
    assert sync(sandbox.settings(state_url))[0] == 0
    uid = next(uid for uid, f in atlassian_by_entra_id(sandbox).items() if f["department"] and not f["organization"])
    sandbox.tenant.update_user(uid, department="")
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0 and summary.counts["users_updated"] == 1, summary
    assert atlassian_by_entra_id(sandbox)[uid]["department"] == ""
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0 and scim_writes(sandbox) == 0 and not summary.drift, summary
