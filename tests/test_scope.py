import pandas as pd
import pytest

from guardsync.config import SyncSettings
from guardsync.errors import ConfigError
from guardsync.flatten import effective_memberships
from guardsync.models import EDGE_COLUMNS, GROUP_COLUMNS, USER_COLUMNS, Snapshot
from guardsync.scope import allowed_domains, scope


def make_user(uid, upn, mail=None, enabled=True):
    return {"id": uid, "userPrincipalName": upn, "mail": mail, "displayName": uid, "givenName": "G", "surname": "S",
            "jobTitle": None, "accountEnabled": enabled, "userType": "Member"}


@pytest.fixture
def snapshot():
    users = [
        make_user("alice", "alice@contoso.com", "alice@contoso.com"),
        make_user("bob", "bob@fabrikam.com", "Bob@Fabrikam.com"),
        make_user("guest", "jane_gmail.com#EXT#@contoso.onmicrosoft.com", "jane@gmail.com"),
        make_user("partner", "p@partner.example", "p@partner.example"),
        make_user("initial", "i@contoso.onmicrosoft.com", None),
        make_user("nomail", "nomail@contoso.com", None),
        make_user("off", "off@contoso.com", "off@contoso.com", enabled=False),
    ]
    groups = [{"id": "g-pilot", "displayName": "Pilot"}, {"id": "g-nested", "displayName": "Nested"},
              {"id": "g-dup1", "displayName": "Twin"}, {"id": "g-dup2", "displayName": "twin"}]
    edges = [("g-pilot", "g-nested", "group"), ("g-nested", "bob", "user"), ("g-pilot", "alice", "user"),
             ("g-pilot", "guest", "user"), ("g-dup1", "nomail", "user")]
    return Snapshot(
        tenant_id="tid", organization="Contoso",
        users=pd.DataFrame(users, columns=USER_COLUMNS), groups=pd.DataFrame(groups, columns=GROUP_COLUMNS),
        edges=pd.DataFrame(edges, columns=EDGE_COLUMNS),
        verified_domains=["contoso.com", "fabrikam.com", "contoso.onmicrosoft.com"], initial_domain="contoso.onmicrosoft.com",
    )


def run(snapshot, **sync):
    flat = effective_memberships(snapshot.edges, snapshot.groups["id"])
    return scope(snapshot, flat, SyncSettings(**sync))


def test_default_domains_are_the_verified_ones_but_the_initial(snapshot):
    assert allowed_domains(snapshot, []) == ["contoso.com", "fabrikam.com"]


def test_unverified_configured_domain_is_a_configuration_error(snapshot):
    with pytest.raises(ConfigError, match="partner.example not verified"):
        allowed_domains(snapshot, ["contoso.com", "partner.example"])


def test_all_users_mode_excludes_guests_and_other_domains(snapshot):
    scoped = run(snapshot)
    assert set(scoped.users["id"]) == {"alice", "bob", "nomail", "off"}
    assert scoped.excluded == {"guest": 1, "domain": 2}
    assert len(scoped.groups) == 4


def test_email_identifier_keeps_entra_spelling_and_sends_missing_mail_to_the_gate(snapshot):
    users = run(snapshot, identifier="email").users.set_index("id")
    assert users.loc["bob", "identifier"] == "Bob@Fabrikam.com"
    assert users.loc["bob", "identifier_key"] == "bob@fabrikam.com"
    assert pd.isna(users.loc["nomail", "identifier"])  # quarantined by the users gate, not excluded


def test_pilot_mode_takes_transitive_members_of_named_groups_case_insensitively(snapshot):
    scoped = run(snapshot, groups=["PILOT"])
    assert set(scoped.users["id"]) == {"alice", "bob"}
    assert list(scoped.groups["id"]) == ["g-pilot"]
    assert set(zip(scoped.memberships["group_id"], scoped.memberships["user_id"])) == {("g-pilot", "alice"), ("g-pilot", "bob")}


def test_group_by_object_id_and_errors_for_missing_or_ambiguous_names(snapshot):
    assert list(run(snapshot, groups=["g-nested"]).groups["id"]) == ["g-nested"]
    with pytest.raises(ConfigError, match="no group named 'Nope'"):
        run(snapshot, groups=["Nope"])
    with pytest.raises(ConfigError, match="2 groups are named 'twin'"):
        run(snapshot, groups=["twin"])


def test_domain_subset(snapshot):
    scoped = run(snapshot, domains=["fabrikam.com"])
    assert set(scoped.users["id"]) == {"bob"}
    assert scoped.excluded["domain"] == 5
