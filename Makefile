# Two commands do all the set-up on a fresh clone (only Python >= 3.11 and make needed):
#   make demo   - creates .venv, installs guardsync, runs `guardsync demo` on the built-in sandbox
#   make demo-ui - the same against a local Prefect server with its UI, kept up until Ctrl-C
#   make test   - creates .venv, installs guardsync with its test tools, runs the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false

.PHONY: demo demo-ui test test-fast test-deep bench bench-quick bench-latency lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit("guardsync needs Python >= 3.11" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guardsync demo

demo-ui: $(STAMP)
	$(BIN)/guardsync demo --ui

# Three workers on two cores (tests wait on loopback HTTP and subprocesses as much as they compute);
# worksteal spreads a long file's tests over the workers. Ends with the ten slowest tests.
PYTEST := $(BIN)/pytest -q -n 3 --dist worksteal --durations=10

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The model test of random histories (tests/test_model.py) ten times deeper than `make test` runs it: 40 fresh
# histories of up to 8 rounds instead of the same 4 of up to 5, a failure shrunk to a short history.
# GUARDSYNC_MODEL_EXAMPLES=N sets the number of histories.
test-deep: $(STAMP)
	GUARDSYNC_MODEL_DEEP=1 $(BIN)/pytest -q -p no:cacheprovider --timeout 0 tests/test_model.py

# Performance: synthetic tenants (10k and 100k users) synced through the sandbox with 20 ms
# injected on every request; prints a table and writes bench-results/*.json (see bench/run.py).
# `make bench` takes about 18 minutes on 2 cores (the 100k initial sync is ~12); bench-quick (2k users) about a minute.
# `python -m bench.floor`: the per-request floor of the sandbox, TLS and HTTP on this machine (see README).
bench: $(STAMP)
	$(BIN)/python -m bench --scenario 10k --scenario 10k-brownfield --scenario 100k

bench-quick: $(STAMP)
	$(BIN)/python -m bench --scenario quick

# The fast cadence (bench/latency.py): a standing worker runs the every-minute schedule on a 10k-user
# sandbox while 10 users are disabled in Entra at random moments; prints leaver latency, worker CPU,
# requests and Prefect database growth beside the 4-hour schedule's. About 20 minutes; needs the
# PostgreSQL server on 127.0.0.1:5432 (`python -m bench.latency --sqlite` does without).
bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency

# Re-pin every dependency (run after changing pyproject.toml, commit constraints.txt).
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .guardsync-demo .pytest_cache
