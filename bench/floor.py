"""The floor under the load stages: how close any client gets to `latency` a request on this machine.

    python -m bench.floor                 # 2,000 POST /Users, 4 in flight, 20 ms latency

It starts the sandbox as the benchmark does (bench.serve, a process of its own) and
creates users with `concurrency` requests in flight, two ways: through guardsync's
ScimClient, with the loader's threads (`concurrency` + SPARE_THREADS) and in-flight limit,
and through a bare urllib3 pool on `concurrency` threads (no retries, no counting: the
least a Python client can do).
For each it prints the time a request spends per slot (wall x concurrency / requests)
and its ratio to the latency. The bare client's ratio is what the sandbox, TLS and
HTTP cost here; guardsync's load stages cannot do better than that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import urllib3

from guardsync.load import SPARE_THREADS
from guardsync.models import DesiredUser
from guardsync.scim import ScimClient, user_resource
from guardsync.throttle import AdaptiveLimit


def new_user(tag: str, number: int) -> DesiredUser:
    return DesiredUser(external_id=str(uuid.uuid4()), user_name=f"floor.{tag}.{number}@contoso.com",
                       display_name=f"Floor {number}", given_name="Floor", family_name=str(number), title="", active=True)


def timed(create, users: list[DesiredUser], threads: int, concurrency: int, latency: float) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, users))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    per_slot = wall * concurrency / len(users)
    return {"requests": len(users), "wall_s": round(wall, 2), "per_request_per_slot_ms": round(per_slot * 1000, 2),
            "ratio_to_latency": round(per_slot / latency, 3), "client_cpu_ms_per_request": round(cpu / len(users) * 1000, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.020)
    args = parser.parse_args(argv)
    server = subprocess.Popen([sys.executable, "-m", "bench.serve", "--users", "10", "--groups", "2", "--memberships",
                               "10", "--latency", str(args.latency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(server.stdout.readline())
        os.environ.update(hello["env"])
        scim_url = hello["config"]["atlassian"]["scim_url"]
        api_key = os.environ[hello["config"]["atlassian"]["api_key"].removeprefix("env:")]
        client = ScimClient(scim_url, api_key)
        client.limit = AdaptiveLimit(args.concurrency)  # as the loader sets it
        url = urlsplit(scim_url)
        pool = urllib3.HTTPSConnectionPool(url.hostname, port=url.port, maxsize=args.concurrency,
                                           ca_certs=os.environ["REQUESTS_CA_BUNDLE"])
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/scim+json"}

        def bare(user: DesiredUser) -> None:
            answer = pool.request("POST", url.path + "/Users", body=json.dumps(user_resource(user)).encode(), headers=headers)
            if answer.status != 201:
                raise RuntimeError(f"POST /Users answered {answer.status}: {answer.data[:200]!r}")
            json.loads(answer.data)

        results = {}
        ways = (("guardsync ScimClient", client.create_user, args.concurrency + SPARE_THREADS),  # as the loader runs
                ("bare urllib3", bare, args.concurrency))
        for name, create, threads in ways:
            users = [new_user(name.split()[-1].lower(), n) for n in range(args.requests)]
            results[name] = timed(create, users, threads, args.concurrency, args.latency)
            print(f"{name:22s} {json.dumps(results[name])}", flush=True)
    finally:
        if server.poll() is None:
            server.stdin.write('{"cmd": "stop"}\n')
            server.stdin.flush()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
