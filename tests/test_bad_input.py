"""Bad input: a corpus of awkward Entra objects, built with the Tenant mutators on a generated tenant.

Every object of the corpus ends one of three ways, and the tests say which: synced
exactly as Entra spells it, quarantined (named, frozen) or excluded (counted). Nothing
crashes a run, nothing is injected into a SCIM filter, a second run writes nothing
(even a --full one, which compares what Atlassian holds with what was written), and
the group-size cap is exact.

Decision on Unicode normalisation: identifiers that differ only by normalisation form
(NFC "é" vs NFD "e" + U+0301) are the same address to people, to RFC 6531 (which
requires NFC) and possibly to Atlassian; they must be treated like case-only twins
(quarantined as duplicate_identifier), i.e. the identifier key should be
NFC(casefold(NFC(identifier))), as scope.identity_key does.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardsync.errors import GuardsyncBlocked
from guardsync.scim import ScimClient, escape_filter_value
from tests.test_faults import atlassian_state, reference, scim_writes  # noqa: F401 - reference is a fixture
from tests.test_flow import transitive_users

USERS, GROUPS, SEED = 60, 8, 31

LONG_NAME = "Ł" + "o" * 998 + "ng"  # 1,000 characters
LONG_TITLE = ("Chief " * 200).strip()  # 1,199 characters
LOCAL_64 = "l" * 64  # the longest local part RFC 5321 allows

# (fields, outcome): outcome is "synced", or the quarantine rule, or the exclusion reason.
CORPUS = [
    (dict(userPrincipalName="o'brien@contoso.com", displayName='Seán O\'Brien "the \\"quoted\\""', givenName="Seán",
          surname="O'Brien"), "synced"),
    (dict(userPrincipalName="back.slash@contoso.com", displayName="Back\\Slash \\\\server\\share", jobTitle="C:\\Users\\admin"),
     "synced"),
    (dict(userPrincipalName="100%real@contoso.com", displayName="100% Real %s %d %(name)s {0} {name} %n",
          jobTitle="%x%x%x"), "synced"),
    (dict(userPrincipalName="jürgen.müller@contoso.com", displayName="Jürgen Müller", givenName="Jürgen", surname="Müller"),
     "synced"),
    (dict(userPrincipalName="rocket🚀@contoso.com", displayName="🚀 Rocket 👩\u200d💻", jobTitle="🧪"), "synced"),
    (dict(userPrincipalName="rtl.user@contoso.com", displayName="مريم الحسن", givenName="מרים", surname="الحسن",
          jobTitle="evil\u202egnp.exe"), "synced"),
    (dict(userPrincipalName=f"{LOCAL_64}@contoso.com", displayName=LONG_NAME, givenName="G" * 300, surname="S" * 300,
          jobTitle=LONG_TITLE), "synced"),
    (dict(userPrincipalName="nulls@contoso.com", mail=None, displayName=None, givenName=None, surname=None, jobTitle=None),
     "synced"),
    (dict(userPrincipalName="control.chars@contoso.com", displayName="Line\nBreak\tTab\r\x0bEnd", jobTitle="\x00nul\x1b[31mred"),
     "synced"),
    (dict(userPrincipalName="bobby@contoso.com", displayName="Robert'); DROP TABLE users;--", jobTitle="' OR '1'='1"), "synced"),
    (dict(userPrincipalName="straße@fabrikam.com", displayName="Straße"), "synced"),
    (dict(userPrincipalName='"quoted local"@contoso.com'), "malformed_identifier"),
    (dict(userPrincipalName='x" or userName pr "@contoso.com'), "malformed_identifier"),
    (dict(userPrincipalName='x"or"1"eq"1@contoso.com'), "malformed_identifier"),
    (dict(userPrincipalName="back\\slash@contoso.com"), "malformed_identifier"),
    (dict(userPrincipalName="trailing.dot.@contoso.com"), "malformed_identifier"),
    (dict(userPrincipalName="two@@contoso.com"), "malformed_identifier"),
    (dict(userPrincipalName="newline@contoso.com\n"), "domain"),  # its domain is "contoso.com\n": not an allowed one
    (dict(userPrincipalName="  spaced@contoso.com"), "malformed_identifier"),
    (dict(userPrincipalName="Casey.Twin@contoso.com"), "duplicate_identifier"),
    (dict(userPrincipalName="casey.twin@CONTOSO.COM"), "duplicate_identifier"),
    (dict(userPrincipalName="STRASSE@fabrikam.com"), "duplicate_identifier"),  # full case folding: ß == SS
    (dict(userPrincipalName="partner_gmail.com#EXT#@contoso.onmicrosoft.com", mail="partner@contoso.com", userType="Guest"),
     "guest"),
    (dict(userPrincipalName="vendor@partner.example"), "domain"),
    (dict(userPrincipalName="disabled.weird'@contoso.com", displayName="Dïsäbled", accountEnabled=False), "disabled"),
    (dict(userPrincipalName="no.enabled.flag@contoso.com", accountEnabled=None), "disabled"),
]
# straße and STRASSE are twins under full case folding: the first is quarantined as well.
CORPUS[10] = (CORPUS[10][0], "duplicate_identifier")

WEIRD_GROUPS = ['x" or displayName pr "', "Ünïcödé Grüppe 🚀", 'Sales/EMEA \\ "Quoted"', "فريق المبيعات",
                "G" * 255, "100% {0} %s"]


def build_corpus(sandbox) -> dict:
    """Add the corpus to the sandbox's tenant; returns ids and names for the assertions."""
    tenant = sandbox.tenant
    ids = {}
    for fields, outcome in CORPUS:
        fields = {"mail": fields["userPrincipalName"], **fields}
        ids[tenant.add_user(**fields)] = (fields, outcome)
    corpus_group = tenant.add_group("Corpus")
    others = [tenant.add_other(kind) for kind in ("device", "servicePrincipal", "orgContact")]
    for member in [*ids, *others]:
        tenant.add_member(corpus_group, member)
    synced = [uid for uid, (_, outcome) in ids.items() if outcome == "synced"]
    weird = {}
    for i, name in enumerate(WEIRD_GROUPS):
        gid = tenant.add_group(name)
        tenant.add_member(gid, synced[i % len(synced)])
        weird[name] = gid
    # Nesting: a self-nested group and a three-group cycle, each with one user and a device.
    selfie = tenant.add_group("Selfie")
    tenant.add_member(selfie, selfie)
    tenant.add_member(selfie, synced[0])
    cycle = [tenant.add_group(f"Cycle {c}") for c in "ABC"]
    for i, gid in enumerate(cycle):
        tenant.add_member(gid, cycle[(i + 1) % 3])
        tenant.add_member(gid, synced[i + 1])
        tenant.add_member(gid, others[0])
    return {"ids": ids, "synced": synced, "corpus_group": corpus_group, "cycle": cycle, "selfie": selfie, "weird": weird}


def upn(corpus, uid) -> str:
    return corpus["ids"][uid][0]["userPrincipalName"]


@pytest.fixture
def corpus_sandbox(make_sandbox):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    return sandbox, build_corpus(sandbox)


def test_the_corpus_is_synced_quarantined_or_excluded_and_never_breaks_a_run(corpus_sandbox, state_url, sync, reference):
    sandbox, corpus = corpus_sandbox
    # Objects made by hand in Atlassian whose names a broken filter would confuse with others.
    hand_group = sandbox.scim.add_group('x" or displayName pr "')
    bystander_user = sandbox.scim.add_user({"userName": "bystander@contoso.com", "displayName": "Not from Entra",
                                            "emails": [{"value": "bystander@contoso.com", "primary": True}], "active": True})
    sandbox.scim.add_group("Hand-made", [bystander_user["id"]])
    sandbox.scim.add_user({"userName": "O'BRIEN@CONTOSO.COM", "emails": [{"value": "o'brien@contoso.com", "primary": True}]})

    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    state = atlassian_state(sandbox)
    users = state["users"]

    # Synced exactly as Entra spells it, attributes and all.
    for uid in corpus["synced"]:
        fields = corpus["ids"][uid][0]
        name = fields["userPrincipalName"]
        assert name in users, name
        external_id, active, display, title, given, family, emails = users[name]
        assert (external_id, active, emails) == (uid, True, (name,))
        assert (display or "") == (fields.get("displayName") or ""), name
        assert (title or "") == (fields.get("jobTitle") or ""), name
        assert (given or "", family or "") == (fields.get("givenName") or "", fields.get("surname") or ""), name
    # Quarantined, excluded and disabled ones never reach Atlassian.
    folded = {name.casefold() for name in users}
    for uid, (fields, outcome) in corpus["ids"].items():
        if outcome != "synced":
            assert fields["userPrincipalName"].casefold() not in folded, (outcome, fields["userPrincipalName"])
    base = reference(users=USERS, groups=GROUPS, seed=SEED)
    base_summary_quarantine = {"duplicate_identifier": 4}  # the generated tenant's own case twins
    malformed = sum(1 for _, outcome in CORPUS if outcome == "malformed_identifier")
    duplicates = sum(1 for _, outcome in CORPUS if outcome == "duplicate_identifier")
    assert summary.quarantined.get("malformed_identifier") == malformed
    assert summary.quarantined.get("duplicate_identifier") == base_summary_quarantine["duplicate_identifier"] + duplicates
    assert summary.excluded["guest"] == 3 + 1
    assert summary.excluded["domain"] == 4 + sum(1 for _, outcome in CORPUS if outcome == "domain")
    assert summary.excluded["disabled_never_synced"] == 3 + 2

    # The generated tenant's users and groups are exactly as without the corpus.
    for name, value in base["users"].items():
        assert users[name] == value, name
    for name, (external_id, members) in base["groups"].items():
        assert state["groups"][name] == (external_id, members), name
    # Devices, service principals and contacts are not members; quarantined users are not either.
    synced_names = {upn(corpus, uid) for uid in corpus["synced"]}
    assert state["groups"]["Corpus"][1] == synced_names
    # Cycles and self-nesting end: every group of the cycle holds the cycle's three users.
    cycle_users = {upn(corpus, corpus["synced"][i]) for i in (1, 2, 3)}
    for c in "ABC":
        assert state["groups"][f"Cycle {c}"][1] == cycle_users
    assert state["groups"]["Selfie"][1] == {upn(corpus, corpus["synced"][0])}
    # Weird group names: created or adopted exactly, nothing else touched.
    for i, name in enumerate(WEIRD_GROUPS):
        assert state["groups"][name][1] == {upn(corpus, corpus["synced"][i % len(corpus["synced"])])}, name
    adopted_id = next(gid for gid, g in sandbox.tenant.groups.items() if g["displayName"] == 'x" or displayName pr "')
    assert state["groups"]['x" or displayName pr "'][0] == adopted_id  # adopted, and marked with its Entra id
    assert sandbox.scim.get_group(hand_group["id"])["displayName"] == 'x" or displayName pr "'
    assert state["groups"]["Hand-made"][1] == {"bystander@contoso.com"}
    assert users["bystander@contoso.com"][2] == "Not from Entra"
    assert summary.counts["users_adopted"] == 1 and summary.counts["groups_adopted"] == 1

    # Round trip: what was written reads back the same, so neither a delta nor a full run writes again.
    sandbox.scim.reset_counts()
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0 and scim_writes(sandbox) == 0, summary
    status, summary = sync(sandbox.settings(state_url), full=True)
    assert status == 0, summary
    assert scim_writes(sandbox) == 0, (summary.drift, sandbox.scim.requests)
    assert atlassian_state(sandbox) == state


def test_a_guest_is_excluded_whichever_identifier_is_chosen(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    guest = sandbox.tenant.add_user(userPrincipalName="ally_outlook.com#EXT#@contoso.onmicrosoft.com",
                                    mail="ally@contoso.com", userType="Guest")
    sandbox.tenant.add_member(next(iter(sandbox.tenant.groups)), guest)
    status, summary = sync(sandbox.settings(state_url, identifier="email"))
    assert status == 0, summary
    assert "ally@contoso.com" not in {u["userName"] for u in sandbox.scim.users()}
    assert summary.excluded["guest"] == 4


@pytest.mark.parametrize("kind", ["user", "group"])
def test_unicode_normalisation_twins_are_quarantined_like_case_twins(kind, make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    nfc = unicodedata.normalize("NFC", "josé.garcía")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd and nfc.casefold() != nfd.casefold()  # the same text to people, two strings to casefold()
    tenant = sandbox.tenant
    if kind == "user":
        twins = [tenant.add_user(userPrincipalName=f"{local}@contoso.com", mail=f"{local}@contoso.com") for local in (nfc, nfd)]
        group = tenant.add_group("Twins")
        for uid in twins:
            tenant.add_member(group, uid)
    else:
        members = sorted(uid for uid, u in tenant.users.items() if u["userPrincipalName"] == u["userPrincipalName"].lower()
                         and u["userPrincipalName"].endswith("@contoso.com") and u["accountEnabled"])
        for name, member in ((f"Team {nfc}", members[0]), (f"Team {nfd}", members[1])):
            tenant.add_member(tenant.add_group(name), member)
    status, summary = sync(sandbox.settings(state_url))
    assert status == 0, summary
    if kind == "user":
        assert summary.quarantined["duplicate_identifier"] == 4 + 2
        synced = {unicodedata.normalize("NFC", u["userName"]) for u in sandbox.scim.users()}
        assert f"{nfc}@contoso.com" not in synced
    else:
        assert summary.counts.get("groups_adopted", 0) == 0
        names = {unicodedata.normalize("NFC", g["displayName"]) for g in sandbox.scim.groups()}
        assert f"Team {nfc}" not in names  # both quarantined (duplicate_group_name): neither is created or adopted


# -- the group-size cap is exact ------------------------------------------------------------------


def test_a_group_of_exactly_max_group_size_passes_and_one_more_blocks(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    tenant = sandbox.tenant
    cap = max(len(transitive_users(tenant, gid)) for gid in tenant.groups) + 3  # above every generated group
    exact = tenant.add_group("Exactly At The Cap")
    for i in range(cap):
        tenant.add_member(exact, tenant.add_user(userPrincipalName=f"cap{i:03d}@contoso.com", mail=f"cap{i:03d}@contoso.com"))
    # Neither a disabled user nor a device counts towards the size.
    tenant.add_member(exact, tenant.add_user(userPrincipalName="cap.disabled@contoso.com", accountEnabled=False))
    tenant.add_member(exact, tenant.add_other("device"))

    status, summary = sync(sandbox.settings(state_url, max_group_size=cap))
    assert status == 0, summary
    before = atlassian_state(sandbox)
    assert len(before["groups"]["Exactly At The Cap"][1]) == cap

    tenant.add_member(exact, tenant.add_user(userPrincipalName="cap.one.more@contoso.com", mail="cap.one.more@contoso.com"))
    sandbox.scim.reset_counts()
    status, error = sync(sandbox.settings(state_url, max_group_size=cap))
    assert status == 3 and isinstance(error, GuardsyncBlocked), error
    message = str(error)
    assert "group_too_large" in message and "Exactly At The Cap" in message and str(cap + 1) in message
    assert "split" in message.lower()
    assert scim_writes(sandbox) == 0  # not even the new user, whose load comes before the groups
    assert atlassian_state(sandbox) == before


def test_one_over_the_cap_on_a_first_run_writes_nothing(make_sandbox, state_url, sync):
    sandbox = make_sandbox(users=USERS, groups=GROUPS, seed=SEED)
    tenant = sandbox.tenant
    cap = max(len(transitive_users(tenant, gid)) for gid in tenant.groups) + 3
    big = tenant.add_group("One Over")
    for i in range(cap + 1):
        tenant.add_member(big, tenant.add_user(userPrincipalName=f"over{i:03d}@contoso.com", mail=f"over{i:03d}@contoso.com"))
    status, error = sync(sandbox.settings(state_url, max_group_size=cap))
    assert status == 3 and "One Over" in str(error)
    assert scim_writes(sandbox) == 0 and sandbox.scim.users() == [] and sandbox.scim.groups() == []


# -- SCIM filters: no injection -------------------------------------------------------------------


INJECTIONS = ['x" or userName pr "', 'x" or "1" eq "1', '"', "\\", '\\"', 'a\\" or userName pr \\"', "x') or ('1'='1",
              "*", "%", "userName pr", "' or 1=1 --", "\u202e", "🚀", "é", "e\u0301", 'x"]', "x\nor userName pr"]


def test_filter_injection_finds_nothing_and_weird_names_find_themselves(sandbox):
    client = ScimClient(sandbox.scim.scim_url, sandbox.api_key)
    for i in range(3):
        sandbox.scim.add_user({"userName": f"victim{i}@contoso.com", "emails": [{"value": f"victim{i}@contoso.com", "primary": True}]})
        sandbox.scim.add_group(f"Victims {i}")
    for value in INJECTIONS:
        assert client.find_user(user_name=value) is None, value
        assert client.find_user(external_id=value) is None, value
        assert client.find_group(value) is None, value
    distinct = {unicodedata.normalize("NFC", v).casefold(): v for v in INJECTIONS}  # the server keeps names unique so
    for value in distinct.values():
        group = sandbox.scim.add_group(f"g {value}")
        assert client.find_group(f"g {value}")["id"] == group["id"], value


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_escaped_filter_values_parse_back_to_themselves(value):
    """Whatever the value, the filter guardsync sends parses (as the SCIM server parses it) to one `eq`
    comparison of userName with exactly that value: nothing of the value escapes into the filter."""
    from scim2_models import SearchRequest
    from scim2_models.path import CompareOperator, Comparison

    parsed = SearchRequest.model_validate({"filter": f"userName eq {escape_filter_value(value)}"}).filter.ast
    assert isinstance(parsed, Comparison) and parsed.op == CompareOperator.eq
    assert parsed.attr_path.attr == "userName" and parsed.value == value


# -- properties of the pure core that tests/test_plan.py and tests/test_flatten.py leave out --------
# (they cover: apply(plan) == desired and re-planning is empty, without frozen objects; flatten
# against a reference closure whatever the edge order). Added here: frozen users and groups,
# planning the desired state against itself, and flatten's independence of the roots' order,
# of duplicated edges and of non-user members, on cycle-dense graphs.

from guardsync.flatten import effective_memberships  # noqa: E402
from guardsync.models import EDGE_COLUMNS, DesiredGroup, DesiredUser  # noqa: E402
from guardsync.models import AppliedGroup, AppliedState, AppliedUser
from guardsync.plan import apply_plan, make_plan  # noqa: E402

_ids = st.sampled_from([f"u{i}" for i in range(8)])
_users = st.dictionaries(_ids, st.tuples(st.booleans(), st.sampled_from(["A", "B"])), max_size=8)
_groups = st.dictionaries(st.sampled_from(["g1", "g2", "g3"]), st.frozensets(_ids), max_size=3)  # names fixed: no renames
_frozen_users = st.frozensets(_ids, max_size=3)
_frozen_groups = st.frozensets(st.sampled_from(["g1", "g2", "g3"]), max_size=1)


def _desired(user_spec, group_spec):
    users = {uid: DesiredUser(uid, f"{uid}@contoso.com", uid, "G", "F", title, active) for uid, (active, title) in user_spec.items()}
    enabled = {uid for uid, user in users.items() if user.active}
    groups = {gid: DesiredGroup(gid, gid.upper(), members & enabled) for gid, members in group_spec.items()}
    return users, groups


def _applied(users, groups) -> AppliedState:
    return AppliedState(
        {uid: AppliedUser(f"scim-{uid}", user) for uid, user in users.items()},
        {gid: AppliedGroup(f"scim-{gid}", group.display_name) for gid, group in groups.items()},
        {gid: group.members for gid, group in groups.items()},
    )


def _as_validate_leaves_it(users, groups, frozen_users, frozen_groups):
    """Quarantined users are not in the desired users nor in any group's members; frozen groups are left out."""
    users = {uid: user for uid, user in users.items() if uid not in frozen_users}
    groups = {gid: DesiredGroup(gid, g.display_name, g.members - frozen_users) for gid, g in groups.items() if gid not in frozen_groups}
    return users, groups


@settings(max_examples=200, deadline=None)
@given(_users, _groups, _frozen_users, _frozen_groups)
def test_planning_the_applied_desired_state_against_itself_is_empty(user_spec, group_spec, frozen_users, frozen_groups):
    users, groups = _desired(user_spec, group_spec)
    applied = _applied(users, groups)
    desired_users, desired_groups = _as_validate_leaves_it(users, groups, frozen_users, frozen_groups)
    assert make_plan(desired_users, desired_groups, applied, frozen_users, frozen_groups).is_empty()


@settings(max_examples=300, deadline=None)
@given(_users, _groups, _users, _groups, _frozen_users, _frozen_groups)
def test_applying_the_plan_with_frozen_objects_yields_the_desired_state(u1, g1, u2, g2, frozen_users, frozen_groups):
    first_users, first_groups = _desired(u1, g1)
    before = apply_plan(AppliedState(), make_plan(first_users, first_groups, AppliedState()))
    users, groups = _desired(u2, g2)
    frozen_users = frozen_users & set(before.users)  # only users already synced can be frozen in place
    frozen_groups = frozen_groups & set(before.groups)
    desired_users, desired_groups = _as_validate_leaves_it(users, groups, frozen_users, frozen_groups)
    plan = make_plan(desired_users, desired_groups, before, frozen_users, frozen_groups)
    after = apply_plan(before, plan)

    touched = {change.user.external_id for change in plan.users}
    assert not touched & frozen_users  # frozen users are neither updated nor deactivated
    for uid in frozen_users:
        assert after.users[uid] == before.users[uid]
    for uid, user in desired_users.items():  # everyone else is as desired (a never-synced disabled user stays absent)
        assert after.users[uid].record == user if uid in after.users else not user.active
    for uid in set(before.users) - set(desired_users) - frozen_users:
        assert after.users[uid].record.active is False  # left scope: deactivated, never deleted
    for gid in frozen_groups:
        assert after.groups[gid] == before.groups[gid] and after.members.get(gid) == before.members.get(gid)
    for gid, group in desired_groups.items():
        kept = before.members.get(gid, frozenset()) & frozen_users  # frozen users' memberships stay as they were
        assert after.members[gid] == group.members | kept
    assert set(after.groups) == set(desired_groups) | frozen_groups
    assert make_plan(desired_users, desired_groups, after, frozen_users, frozen_groups).is_empty()


_group_ids = st.sampled_from([f"g{i}" for i in range(5)])
_member = st.one_of(
    st.tuples(_group_ids, _group_ids, st.just("group")),  # includes self-nesting and cycles
    st.tuples(_group_ids, st.sampled_from([f"u{i}" for i in range(6)]), st.just("user")),
    st.tuples(_group_ids, st.sampled_from(["d1", "sp1", "c1"]), st.sampled_from(["device", "servicePrincipal", "orgContact"])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_member, min_size=0, max_size=60), st.randoms(use_true_random=False))
def test_flattening_ignores_roots_order_duplicates_and_non_users_and_ends_on_cycles(rows, rnd):
    import pandas as pd

    roots = [f"g{i}" for i in range(5)]
    reference_pairs = set(zip(*_columns(effective_memberships(pd.DataFrame(rows, columns=EDGE_COLUMNS), roots))))
    shuffled_roots = roots[:]
    rnd.shuffle(shuffled_roots)
    noisy = rows + rows[: len(rows) // 2] + [(f"g{i}", f"g{(i + 1) % 5}", "group") for i in range(5)]  # a 5-cycle more
    rnd.shuffle(noisy)
    frame = effective_memberships(pd.DataFrame(noisy, columns=EDGE_COLUMNS), shuffled_roots + shuffled_roots[:2])
    pairs = list(zip(*_columns(frame)))
    assert len(pairs) == len(set(pairs))  # each (group, user) once
    assert all(user.startswith("u") for _, user in pairs)  # devices, service principals, contacts never members
    users_anywhere = {child for _, child, kind in rows if kind == "user"}
    # The 5-cycle joins every group: each then holds every user of any group.
    assert set(pairs) == {(g, u) for g in roots for u in users_anywhere}
    assert reference_pairs <= set(pairs)


def _columns(frame):
    return frame["group_id"].tolist(), frame["user_id"].tolist()


def test_a_renamed_group_keeps_its_frozen_members():
    alice = DesiredUser("a", "a@contoso.com", "A", "A", "A", "", True)
    quinn = DesiredUser("q", "q@contoso.com", "Q", "Q", "Q", "", True)
    before = AppliedState({"a": AppliedUser("s-a", alice), "q": AppliedUser("s-q", quinn)},
                          {"g": AppliedGroup("s-g", "Sales")}, {"g": frozenset({"a", "q"})})
    # q is quarantined this run: left out of the desired users and of every group's members.
    plan = make_plan({"a": alice}, {"g": DesiredGroup("g", "Sales EMEA", frozenset({"a"}))}, before, frozenset({"q"}))
    assert [change.kind for change in plan.groups] == ["rename"]
    assert apply_plan(before, plan).members["g"] == frozenset({"a", "q"})
