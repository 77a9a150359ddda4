import threading
import time

from guardsync.throttle import AdaptiveLimit


def test_throttling_halves_and_successes_recover_to_the_ceiling():
    limit = AdaptiveLimit(8, recover_after=3)
    limit.throttled()
    limit.throttled()
    assert limit.limit == 2 and limit.lowest == 2
    for _ in range(3 * 6):
        limit.succeeded()
    assert limit.limit == 8  # back up, and never above the ceiling
    for _ in range(10):
        limit.throttled()
    assert limit.limit == 1  # never below one


def test_never_more_writes_in_flight_than_the_limit():
    limit = AdaptiveLimit(6)
    limit.throttled()  # 3 allowed
    peak, in_flight, lock = 0, 0, threading.Lock()

    def write():
        nonlocal peak, in_flight
        with limit.slot():
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            time.sleep(0.01)
            with lock:
                in_flight -= 1

    threads = [threading.Thread(target=write) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 3


def test_a_load_keeps_exactly_write_concurrency_requests_in_flight_at_atlassian(make_sandbox, state_url, sync):
    # The limit holds at the server (the SCIM client takes a slot around each request), and is reached.
    sandbox = make_sandbox(users=300, groups=10)
    sandbox.scim.latency = 0.02
    status, summary = sync(sandbox.settings(state_url, write_concurrency=3))
    assert status == 0, summary
    assert summary.counts["users_created"] > 200
    assert sandbox.scim.most_in_flight == 3
