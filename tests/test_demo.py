"""`guardsync demo`, the README's main job, as a person runs it: a subprocess, no credentials."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_three_syncs_and_prints_their_summaries(tmp_path):
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the demo starts its own temporary server, as on a fresh machine
    guardsync = Path(sys.executable).with_name("guardsync")
    done = subprocess.run([str(guardsync), "demo", "--users", "150", "--workdir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("Summary of run")]
    assert len(summaries) == 3 and all("(sync, completed)" in line for line in summaries)
    assert "users created" in done.stdout and "groups created" in done.stdout
    # Product access: granted on the full sync, and the group renamed in step 3 keeps its product.
    assert "product access granted 5" in done.stdout and "Atlassian may email the users who gained a product" in done.stdout
    last = [line for line in done.stdout.splitlines() if line.strip().startswith("Product access in Atlassian:")][-1]
    assert "(renamed): jira-software@contoso.atlassian.net" in last, last
    assert "renamed groups were re-created" not in done.stdout  # nothing left to grant again by hand
    assert "Where to look: in the Prefect UI" in done.stdout
    assert (tmp_path / "demo" / "state.db").exists()
