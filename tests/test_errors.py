"""What reaches the command line when something goes wrong that guardsync did not foresee, and how long a
throttled request is waited out: the budget and the timeout are settings."""

from __future__ import annotations

import re

import pytest
import sqlalchemy

from guardsync.errors import TransientError
from guardsync.sandbox.http import Fault
from guardsync.state import StateStore
from tests.test_config import cli_env, error_lines, run_cli, write_config


def test_an_unexpected_error_is_one_line_that_says_where_the_details_are(sandbox, tmp_path, prefect_server):
    """The state database refuses the run record (a trigger): not an error guardsync maps, so no type of its own."""
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(state_url)
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TRIGGER no_runs BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    store.dispose()
    log = tmp_path / "logs" / "errors.log"
    config = write_config(tmp_path / "guardsync.toml", sandbox.config(state_url))
    done = run_cli(["sync", "--config", str(config)], cli_env(sandbox, tmp_path / "home", GUARDSYNC_ERROR_LOG=str(log)))

    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "unexpected error sqlalchemy.IntegrityError" in lines[0]
    run_id = re.search(r"Prefect flow run ([0-9a-f-]{36})", lines[0])
    assert run_id and str(log) in lines[0], lines[0]
    details = log.read_text()
    assert "Traceback" in details and "IntegrityError" in details and run_id.group(1) in details
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_a_retry_after_within_the_budget_is_waited_out_and_one_beyond_it_says_which_setting(sandbox, state_url, sync,
                                                                                             monkeypatch):
    import tasks.extract as extract_module  # the flow imports its stages where it runs them

    monkeypatch.setattr(extract_module, "extract", extract_module.extract.with_options(retry_delay_seconds=0))
    settings = sandbox.settings(state_url)
    assert (settings.sync.retry_budget_seconds, settings.sync.request_timeout_seconds) == (900, 60)  # safe defaults
    tight = settings.model_copy(update={"sync": settings.sync.model_copy(update={"retry_budget_seconds": 2})})
    sandbox.graph.inject(Fault("GET", r"^/v1\.0/users", 429, times=1, headers={"Retry-After": "3"}))  # no task retry sooner
    status, error = sync(tight)
    assert status == 1 and isinstance(error, TransientError)
    assert "retry budget of 2 s ([sync] retry_budget_seconds" in str(error) and "asked to wait 3 s more" in str(error)

    throttled = sandbox.graph.inject(Fault("GET", r"^/v1\.0/users", 429, times=1, headers={"Retry-After": "3"}))
    status, summary = sync(settings)  # the default budget: waited out, not failed
    assert status == 0, summary
    assert throttled.times == 0


def test_scim_says_which_setting_bounds_its_retries(sandbox):
    from guardsync.scim import ScimClient

    client = ScimClient(sandbox.scim.scim_url, sandbox.api_key, max_retry_seconds=1)
    sandbox.scim.inject(Fault("GET", r"/Users", 429, times=1, headers={"Retry-After": "5"}))
    with pytest.raises(TransientError, match=r"retry budget of 1s \(\[sync\] retry_budget_seconds\)"):
        client.find_user(user_name="nobody@contoso.com")
