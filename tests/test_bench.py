"""The benchmark's accounting on a small tenant: requests made against the fewest the job needs.

Runs the real flow in-process over the sandbox (no latency) through the same Server the
benchmark drives in its own process (bench.serve), three times: initial sync, a re-run
with no change, a re-run after 1% churn. Counts only, never times.
"""

import pytest

from bench import model
from bench.serve import DOMAINS, Server
from guardsync.sandbox.stack import Sandbox
from guardsync.sandbox.tenant import generate_tenant

WRITES = ("POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def bench_server(monkeypatch):
    tenant = generate_tenant(users=300, groups=30, memberships=1200, depth=4, seed=7, domains=DOMAINS, bad_records=False)
    server = Server(tenant, Sandbox(tenant, atlassian_domains=set(DOMAINS)).start())
    for name, value in server.sandbox.environment().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


def one_run(server: Server, sync, settings) -> tuple[dict, dict, dict]:
    """(expected minima, requests the servers saw, verification) of one flow run."""
    expected = server.expect(None)
    server.reset_counts(None)
    status, summary = sync(settings)
    assert status == 0, summary
    counts = server.counts(None)
    server.commit(None)
    return expected, counts, server.verify(None)


def writes(counts: dict[str, int]) -> int:
    return sum(n for key, n in counts.items() if key.split(" ", 1)[0] in WRITES)


def test_requests_stay_within_5_percent_of_the_minimum(bench_server, tmp_path, sync):
    settings = bench_server.sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}")

    # Initial sync: one write per user and group, one PATCH per group per 100 members,
    # and the tenant read at Graph's largest pages.
    expected, counts, verified = one_run(bench_server, sync, settings)
    assert verified["ok"], verified
    graph_min = sum(expected["graph_full"].values())
    assert expected["changes"]["users_created"] == 300 and expected["changes"]["groups_created"] == 30
    assert counts["scim"] == {k: v for k, v in expected["scim"].items() if v}  # exactly the minimum, by endpoint
    assert sum(counts["graph"].values()) <= 1.05 * graph_min, (counts["graph"], expected["graph_full"])

    # No change: nothing written, and a delta round reads only that nothing changed.
    expected, counts, verified = one_run(bench_server, sync, settings)
    assert verified["ok"], verified
    assert writes(counts["scim"]) == 0 and sum(counts["scim"].values()) == 0
    assert sum(counts["graph"].values()) <= 1.05 * sum(expected["graph_delta"].values()) <= 10, counts["graph"]

    # 1% churn (updates, disables, joiners, leavers, membership moves): one write per change.
    bench_server.churn({"fraction": 0.01, "seed": 1})
    expected, counts, verified = one_run(bench_server, sync, settings)
    assert verified["ok"], verified
    assert counts["scim"] == {k: v for k, v in expected["scim"].items() if v}
    assert sum(counts["graph"].values()) <= 1.05 * sum(expected["graph_delta"].values()), (counts["graph"], expected["graph_delta"])


def test_a_brownfield_first_run_costs_list_pages_and_one_write_per_object_that_differs(bench_server, tmp_path, sync):
    """Atlassian already holds every user (no externalId, 10% stale titles) and every group with its members."""
    provisioned = bench_server.provision({"stale": 0.1, "seed": 3})
    assert provisioned == {"users": 300, "groups": 30, "stale_titles": 30}
    settings = bench_server.sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}")
    expected, counts, verified = one_run(bench_server, sync, settings)
    assert verified["ok"], verified
    # 3 pages of users, 1 of groups; one PUT per account and one PATCH per group (their externalId); no POST.
    assert expected["scim"]["GET /Users"] == 3 and expected["scim"]["GET /Groups"] == 1
    assert expected["changes"]["users_adopted"] == 300 and expected["changes"]["users_created"] == 0
    assert counts["scim"] == {k: v for k, v in expected["scim"].items() if v}  # exactly the minimum, by endpoint
    expected, counts, verified = one_run(bench_server, sync, settings)
    assert verified["ok"] and writes(counts["scim"]) == 0, counts["scim"]


def test_minimum_counts_follow_the_definition():
    tenant = generate_tenant(users=2100, groups=12, memberships=6000, depth=4, seed=3, domains=DOMAINS, bad_records=False)
    full = model.graph_minimum_full(tenant)
    # 2,100 users: 3 pages of 999 and one delta `latest` beat 11 delta pages of 200.
    assert full["GET /v1.0/users"] == 3 and full["GET /v1.0/users/delta"] == 1
    # Groups and members: /groups/delta at 200 groups and 500 links a page, or /groups plus each
    # group's /members (at least one request each) and a delta `latest`: whichever is fewer.
    links = sum(len(m) for m in tenant.members.values())
    by_delta = max(1, -(-len(tenant.groups) // 200), -(-links // 500))
    by_listing = 1 + sum(max(1, -(-len(m) // 999)) for m in tenant.members.values()) + 1
    read_groups = sum(n for key, n in full.items() if "/groups" in key)
    assert read_groups == min(by_delta, by_listing)
    desired = model.desired_state(tenant)
    writes_, applied = model.scim_minimum(model.Applied(), desired)
    assert writes_.users_created == 2100 and writes_.groups_created == 12
    assert writes_.member_patches == sum(-(-len(members) // 100) for _, members in desired.groups.values())
    again, _ = model.scim_minimum(applied, model.desired_state(tenant))
    assert again.total() == 0


def test_the_latency_bench_sees_a_leaver_go_inactive_after_the_run(bench_server, tmp_path, sync):
    settings = bench_server.sandbox.settings(f"sqlite:///{tmp_path / 'state.db'}")
    assert sync(settings)[0] == 0
    made = bench_server.disable({"seed": 3})
    assert bench_server.leavers(None) == {made["id"]: [made["at"], True]}  # disabled in Entra, active in Atlassian
    assert sync(settings)[0] == 0
    assert bench_server.leavers(None) == {made["id"]: [made["at"], False]}
    assert bench_server.disable({"seed": 3})["id"] != made["id"]  # a leaver is picked among the active only


def test_the_latency_bench_matches_each_run_with_its_process_and_ranks_percentiles():
    from bench.latency import percentile, process_by_run

    runs = [{"id": "b", "end_time": "2026-01-01T00:01:00+00:00"}, {"id": "a", "end_time": "2026-01-01T00:00:00+00:00"}]
    start = 1767225600.0  # 2026-01-01T00:00:00Z
    reaped = [(start + 60.4, 2.5, 9.0), (start + 0.3, 1.5, 8.0), (start - 30, 9.0, 7.0)]  # the last: before both
    assert process_by_run(runs, reaped) == {"a": reaped[1], "b": reaped[0]}
    assert percentile([float(x) for x in range(1, 11)], 0.95) == 10 and percentile([3.0, 1.0, 2.0], 0.5) == 2
