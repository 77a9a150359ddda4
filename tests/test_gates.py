"""The gates: GX suites in expectations/ run over the frames the scope stage builds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from guardsync import gates
from guardsync.errors import GuardsyncBlocked, GuardsyncError
from guardsync.gates import blocked_message, load_suite
from guardsync.validate import time_zones

REPO_SUITES = Path(__file__).resolve().parent.parent / "expectations"


def run_gate(name, frame, parameters=None, **options):
    """gates.run_gate with the suite parameter the users gate takes in a run (validate.time_zones)."""
    given = {**({"time_zones": time_zones()} if name == "users" else {}), **(parameters or {})}
    return gates.run_gate(name, frame, given, **options)


def users_frame(rows, dtype=None):
    """rows: (id, identifier, display_name[, preferred_language, timezone]); identifier_key is the casefolded identifier."""
    rows = [tuple(row) + (None,) * (5 - len(row)) for row in rows]
    frame = pd.DataFrame(rows, columns=["id", "identifier", "display_name", "preferred_language", "timezone"], dtype=dtype)
    frame["identifier_key"] = frame["identifier"].str.casefold()
    frame["enabled"] = True
    return frame[["id", "identifier", "identifier_key", "display_name", "enabled", "preferred_language", "timezone"]]


def groups_frame(rows):
    """rows: (id, display_name, member_count)."""
    frame = pd.DataFrame(rows, columns=["id", "display_name", "member_count"])
    frame["display_name_key"] = frame["display_name"].str.casefold()
    return frame[["id", "display_name", "display_name_key", "member_count"]]


def memberships_frame(pairs):
    return pd.DataFrame(pairs, columns=["group_id", "user_id"])


CLEAN_USERS = [
    ("u1", "ann.lee@contoso.com", "Ann Lee"),
    ("u2", "Bob.Stone@Contoso.com", "Bob Stone"),
    ("u3", "o'brien+ops@eu.contoso.co.uk", "Pat O'Brien"),
    ("u4", "jörg.müller@contoso.de", "Jörg Müller"),
]


@pytest.fixture
def suites(tmp_path):
    """A private copy of the repository's suites, to edit."""
    target = tmp_path / "expectations"
    shutil.copytree(REPO_SUITES, target)
    return target


def edit(directory: Path, name: str, change) -> None:
    path = directory / f"{name}.json"
    suite = json.loads(path.read_text())
    change(suite)
    path.write_text(json.dumps(suite, indent=2))


def outcome(result, rule):
    [found] = [o for o in result.outcomes if o.rule == rule]
    return found


# --------------------------------------------------------------------------- clean data


def test_clean_frames_pass():
    users = run_gate("users", users_frame(CLEAN_USERS))
    groups = run_gate("groups", groups_frame([("g1", "Engineering", 3), ("g2", "Sales", 0)]), {"max_group_size": 10})
    members = run_gate("memberships", memberships_frame([("g1", "u1"), ("g1", "u2"), ("g2", "u1")]))
    for result, name, count in ((users, "users", 7), (groups, "groups", 6), (members, "memberships", 3)):
        assert result.suite == name
        assert len(result.outcomes) == count
        assert all(o.success and o.failed_count == 0 and o.failed_ids == () for o in result.outcomes), result
        assert result.blocking == []
        assert result.quarantined_ids == frozenset()


def test_frames_use_the_pandas_str_dtype():
    # The gates see what pandas 3 builds from Python strings (with missing values).
    frame = users_frame(CLEAN_USERS + [("u5", None, "No Mail")])
    assert frame["identifier"].dtype == "str"
    assert frame["identifier"].isna().sum() == 1


def test_empty_frames_pass():
    users = run_gate("users", users_frame([]))
    groups = run_gate("groups", groups_frame([]), {"max_group_size": 10})
    members = run_gate("memberships", memberships_frame([]))
    for result in (users, groups, members):
        assert result.outcomes and all(o.success for o in result.outcomes)
        assert result.blocking == [] and result.quarantined_ids == frozenset()


# --------------------------------------------------------------------------- warning rules


@pytest.mark.parametrize("dtype", [None, object], ids=["str-dtype", "object-dtype"])
def test_each_warning_rule_quarantines_exactly_its_rows(dtype):
    frame = users_frame(
        CLEAN_USERS
        + [
            ("u10", None, "No Identifier"),
            ("u11", "not-an-address", "Malformed"),
            ("u12", "two@@contoso.com", "Two Ats"),
            ("u13", "Dana@Contoso.com", "Dana Upper"),
            ("u14", "dana@contoso.com", "Dana Lower"),
        ],
        dtype=dtype,
    )
    result = run_gate("users", frame)

    missing = outcome(result, "missing_identifier")
    assert (missing.severity, missing.success, missing.failed_ids, missing.failed_count) == ("warning", False, ("u10",), 1)
    malformed = outcome(result, "malformed_identifier")
    assert (malformed.success, set(malformed.failed_ids), malformed.failed_count) == (False, {"u11", "u12"}, 2)
    assert set(malformed.examples) == {"not-an-address", "two@@contoso.com"}
    duplicate = outcome(result, "duplicate_identifier")  # both rows of a case-insensitive duplicate
    assert (duplicate.success, set(duplicate.failed_ids), duplicate.failed_count) == (False, {"u13", "u14"}, 2)
    assert duplicate.examples == ("dana@contoso.com", "dana@contoso.com")
    assert set(duplicate.labels) == {"Dana Upper", "Dana Lower"}

    assert result.blocking == []
    assert result.quarantined_ids == {"u10", "u11", "u12", "u13", "u14"}
    assert result.quarantined_by_rule() == {
        "missing_identifier": {"u10"},
        "malformed_identifier": {"u11", "u12"},
        "duplicate_identifier": {"u13", "u14"},
    }


@pytest.mark.parametrize(
    "address, ok",
    [
        ("ann.lee@contoso.com", True),
        ("first+tag@sub.contoso.co.uk", True),
        ("jörg@bücher.de", True),  # Unicode local part and IDN domain are allowed
        ("x@xn--bcher-kva.de", True),
        ("user@localhost", False),  # no dot in the domain
        ("a b@contoso.com", False),
        (".ann@contoso.com", False),
        ("ann..lee@contoso.com", False),
        ("ann@-contoso.com", False),
        ("ann@contoso.com\n", False),
        ("<ann@contoso.com>", False),
        ("@contoso.com", False),
    ],
)
def test_identifier_regex(address, ok):
    result = run_gate("users", users_frame([("u1", address, "Someone")]))
    assert outcome(result, "malformed_identifier").success is ok


def test_duplicate_group_name_quarantines_every_group_sharing_it():
    frame = groups_frame([("g1", "Engineering", 2), ("g2", "ENGINEERING", 2), ("g3", "Sales", 1)])
    result = run_gate("groups", frame, {"max_group_size": 10})
    assert result.blocking == []
    assert result.quarantined_ids == {"g1", "g2"}
    assert outcome(result, "duplicate_group_name").failed_count == 2


def test_ids_follow_rows_whatever_the_index():
    # A filtered frame (gaps in the index) and a named index both map back to the right ids.
    frame = users_frame(CLEAN_USERS + [("u10", "broken", "Broken"), ("u11", "fine@contoso.com", "Fine")])
    gappy = frame.iloc[[5, 0, 4, 2]]  # index 5, 0, 4, 2
    assert outcome(run_gate("users", gappy), "malformed_identifier").failed_ids == ("u10",)
    named = frame.set_index(pd.Index(range(100, 100 + len(frame)), name="row"))
    assert outcome(run_gate("users", named), "malformed_identifier").failed_ids == ("u10",)


# --------------------------------------------------------------------------- critical rules


@pytest.mark.parametrize("limit, blocked", [(10, {"g2", "g3", "g4"}), (10_000, {"g4"})])
def test_group_too_large_blocks_and_follows_the_parameter(limit, blocked):
    frame = groups_frame([("g1", "Ten", 10), ("g2", "Eleven", 11), ("g3", "Big", 10_000), ("g4", "Huge", 10_001)])
    result = run_gate("groups", frame, {"max_group_size": limit})
    [too_large] = result.blocking
    assert too_large.rule == "group_too_large"
    assert too_large.severity == "critical"
    assert set(too_large.failed_ids) == blocked
    assert too_large.failed_count == len(blocked)
    assert too_large.examples == tuple(str(n) for n, g in ((11, "g2"), (10_000, "g3"), (10_001, "g4")) if g in blocked)
    assert too_large.advice.startswith(f"Split the group into groups of at most {limit} members")
    assert result.quarantined_ids == frozenset()


def test_critical_rules_block():
    users = run_gate("users", users_frame(CLEAN_USERS + [("u1", "other@contoso.com", "Same Id")]))
    assert [o.rule for o in users.blocking] == ["duplicate_user_id"]
    assert users.blocking[0].failed_ids == ("u1", "u1")

    groups = run_gate("groups", groups_frame([("g1", None, 1), ("g2", "  ", 1)]), {"max_group_size": 10})
    assert {o.rule: o.failed_ids for o in groups.blocking} == {"missing_group_name": ("g1",), "blank_group_name": ("g2",)}

    members = run_gate("memberships", memberships_frame([("g1", "u1"), ("g1", "u2"), ("g1", "u1"), (None, "u3")]))
    assert {o.rule: o.failed_ids for o in members.blocking} == {
        "missing_membership_group": ("(missing)/u3",),
        "duplicate_membership": ("g1/u1", "g1/u1"),
    }
    assert members.quarantined_ids == frozenset()


def test_blocked_message_lists_twenty_examples_the_count_and_the_advice():
    frame = groups_frame([(f"g{i:02d}", f"Team {i:02d}", 100 + i) for i in range(25)] + [("ok", "Small", 5)])
    result = run_gate("groups", frame, {"max_group_size": 50})
    [too_large] = result.blocking
    assert len(too_large.failed_ids) == 25 and len(too_large.examples) == 20 and len(too_large.labels) == 20
    message = blocked_message(result)
    assert len(message.split("\n\n")) == 1  # one paragraph per failing critical outcome
    assert "group_too_large" in message
    shown = re.findall(r"id (g\d\d): (\d+)", message)
    assert shown == [(f"g{i:02d}", str(100 + i)) for i in range(20)]
    assert '"Team 00"' in message and "g20" not in message and "Small" not in message
    assert "25 in total" in message and "5 more" in message
    assert "Split the group into groups of at most 50 members" in message
    # what the caller raises with it
    error = GuardsyncBlocked(result.blocking[0].rule, message, result.blocking[0].advice)
    assert error.exit_code == 3


def test_blocked_message_has_a_paragraph_per_failed_critical_rule():
    frame = memberships_frame([("g1", "u1"), ("g1", "u1"), ("g2", None)])
    message = blocked_message(run_gate("memberships", frame))
    paragraphs = message.split("\n\n")
    assert [re.search(r"rule (\w+)", p).group(1) for p in paragraphs] == ["missing_membership_user", "duplicate_membership"]
    assert "g1/u1" in paragraphs[1] and "2 in total" in paragraphs[1]


def test_blocked_message_is_empty_when_nothing_blocks():
    assert blocked_message(run_gate("users", users_frame(CLEAN_USERS + [("u9", None, "Quarantined")]))) == ""


# --------------------------------------------------------------------------- the suites are data


def test_editing_a_severity_changes_the_outcome_without_code(suites):
    frame = users_frame(CLEAN_USERS + [("u13", "Dana@Contoso.com", "A"), ("u14", "dana@contoso.com", "B")])
    before = run_gate("users", frame, directory=suites)
    assert before.blocking == [] and before.quarantined_ids == {"u13", "u14"}

    def make_critical(suite):
        [exp] = [e for e in suite["expectations"] if e["meta"]["rule"] == "duplicate_identifier"]
        exp["severity"] = "critical"

    edit(suites, "users", make_critical)
    after = run_gate("users", frame, directory=suites)
    assert [o.rule for o in after.blocking] == ["duplicate_identifier"]
    assert after.quarantined_ids == frozenset()


def test_the_folder_comes_from_guardsync_expectations(suites, monkeypatch):
    edit(suites, "memberships", lambda s: s["expectations"][2].update(severity="info"))
    monkeypatch.setenv("GUARDSYNC_EXPECTATIONS", str(suites))
    result = run_gate("memberships", memberships_frame([("g1", "u1"), ("g1", "u1")]))
    assert result.blocking == [] and result.quarantined_ids == frozenset()
    assert outcome(result, "duplicate_membership").failed_count == 2  # reported, nothing more


def test_shipped_suites_are_readable_contracts():
    for name in ("users", "groups", "memberships"):
        suite = load_suite(name, REPO_SUITES)
        assert suite["name"] == name
        rules = [e["meta"]["rule"] for e in suite["expectations"]]
        assert len(rules) == len(set(rules))
        for exp in suite["expectations"]:
            assert re.fullmatch(r"[a-z]+(_[a-z]+)*", exp["meta"]["rule"]), exp
            assert len(exp["meta"]["advice"]) > 20, exp
            assert exp["severity"] in ("critical", "warning")


# --------------------------------------------------------------------------- broken suites


def test_a_broken_expectation_is_an_error_not_a_block(suites):
    edit(suites, "users", lambda s: s["expectations"][2]["kwargs"].update(column="no_such_column"))
    for frame in (users_frame(CLEAN_USERS), users_frame([])):
        with pytest.raises(GuardsyncError) as raised:
            run_gate("users", frame, directory=suites)
        assert not isinstance(raised.value, GuardsyncBlocked)
        assert raised.value.exit_code == 1
        message = str(raised.value)
        assert str(suites / "users.json") in message
        assert "expect_column_values_to_not_be_null" in message
        assert 'The column "no_such_column" in BatchData does not exist' in message


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s["expectations"][0]["kwargs"].update(colum="id"), ["expect_column_values_to_not_be_null", "colum"]),
        (lambda s: s["expectations"][0].update(type="expect_column_values_to_not_be_nul"), ["no expectation of that type"]),
        (lambda s: s["expectations"][0].update(severity="fatal"), ["must be one of critical, warning, info", "fatal"]),
        (lambda s: s["expectations"][0].pop("severity"), ["must be one of critical, warning, info"]),
        (lambda s: s.update(expectations={"not": "a list"}), ["'expectations' must be a list"]),
    ],
    ids=["bad-kwarg", "unknown-type", "bad-severity", "no-severity", "not-a-list"],
)
def test_an_invalid_suite_is_an_error_naming_the_file(suites, change, words):
    edit(suites, "users", change)
    with pytest.raises(GuardsyncError) as raised:
        run_gate("users", users_frame(CLEAN_USERS), directory=suites)
    assert not isinstance(raised.value, GuardsyncBlocked)
    assert str(suites / "users.json") in str(raised.value)
    for word in words:
        assert word in str(raised.value)


def test_an_unparsable_suite_is_an_error_naming_the_file(suites):
    (suites / "groups.json").write_text('{"name": "groups", "expectations": [,]}')
    with pytest.raises(GuardsyncError, match=r"groups\.json is not valid JSON \(line 1, column 37") as raised:
        run_gate("groups", groups_frame([("g1", "A", 1)]), {"max_group_size": 10}, directory=suites)
    assert str(suites / "groups.json") in str(raised.value)


def test_a_missing_suite_or_parameter_is_an_error(suites):
    (suites / "memberships.json").unlink()
    with pytest.raises(GuardsyncError, match=r"memberships\.json not found.*GUARDSYNC_EXPECTATIONS"):
        run_gate("memberships", memberships_frame([]), directory=suites)
    with pytest.raises(GuardsyncError, match=r"needs the suite parameter\(s\) max_group_size"):
        run_gate("groups", groups_frame([("g1", "A", 1)]), directory=suites)


def test_default_folder_is_the_repository_expectations(monkeypatch):
    monkeypatch.delenv("GUARDSYNC_EXPECTATIONS", raising=False)
    assert gates.expectations_dir() == REPO_SUITES
    assert gates.suite_path("users") == REPO_SUITES / "users.json"
