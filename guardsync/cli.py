"""The guardsync command line (the contract in DESIGN.md).

Exit status: 0 completed (quarantined rows allowed), 3 blocked by a gate or guard,
1 any other failure. Errors are one line naming the cause and the fix.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import shlex
import sys

# Before anything imports Prefect or Great Expectations: nothing phones home. And without
# PREFECT_API_URL, Prefect starts a temporary local server: it imports for ~7 s on an idle
# 2-core machine, and more than Prefect's default 20 s wait when the machine is busy.
for _name, _value in (
    ("DO_NOT_TRACK", "1"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("GX_ANALYTICS_ENABLED", "false"),
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
):
    os.environ.setdefault(_name, _value)

import logging  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from guardsync.config import Settings, load_settings, preflight  # noqa: E402
from guardsync.errors import GuardsyncError  # noqa: E402
from guardsync.progress import print_plan_table, print_summary_table  # noqa: E402
from guardsync.summary import SUMMARY_LOG_MARK, RunSummary  # noqa: E402
from guardsync.text import plain  # noqa: E402


def run_flow(settings: Settings, *, dry_run: bool = False, full: bool = False, allow_mass_deactivation: bool = False,
             out=sys.stdout, approve_run: str | None = None, approval_reason: str = "", config_path: str = "FILE") -> int:
    """One run of the sync-directory flow, in this process; prints the summary; returns the exit status.
    `approve_run`: apply the plan that run held, if it is still the plan (`guardsync approve`)."""
    preflight(settings)
    from flows.sync_directory import WritesFailed, sync_directory  # Prefect loads only when a flow runs

    quiet_expected_tracebacks()
    skip_final_collection()
    try:
        result = sync_directory(settings=settings, dry_run=dry_run, full=full,
                                allow_mass_deactivation=allow_mass_deactivation, approve_run=approve_run,
                                approval_reason=approval_reason)
    except WritesFailed as exc:
        print_summary_table(exc.summary, out)
        print(f"guardsync: {plain(exc)}", file=sys.stderr)
        return exc.exit_code
    except GuardsyncError as exc:
        print_run_summary(exc, out)
        print(f"guardsync: {plain(exc)}", file=sys.stderr)
        if held_run := getattr(exc, "held_run", None):  # a guard holds the plan: say how to apply it as shown
            print(f"guardsync: to apply exactly this plan: guardsync approve --config {shlex.quote(config_path)} "
                  f"{held_run} --reason \"WHY\"", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug or an outage nobody mapped: one line, the details in the error log
        print_run_summary(exc, out)
        return report_unexpected(exc, getattr(exc, "flow_run_id", None))
    summary = RunSummary(**result)
    if summary.mode == "dry-run":
        print_plan_table(None, summary.plan_changes, out, total=summary.planned_changes)  # the summary has the counts
    print_summary_table(summary, out)
    return 0


def print_run_summary(exc: BaseException, out) -> None:
    """A run that stopped (blocked, failed) ends with its summary as a completed one does (the flow hands it
    over on the exception); an error before the flow began has none."""
    summary = getattr(exc, "run_summary", None)
    if isinstance(summary, RunSummary):
        print_summary_table(summary, out)


def error_log() -> Path:
    """Where unexpected errors' tracebacks go: GUARDSYNC_ERROR_LOG, else ~/.guardsync/errors.log."""
    return Path(os.environ.get("GUARDSYNC_ERROR_LOG") or Path.home() / ".guardsync" / "errors.log").expanduser()


def report_unexpected(exc: BaseException, flow_run_id: str | None = None) -> int:
    """One line on the terminal naming the error and where its details are; the traceback goes to the error log."""
    cause = f"{type(exc).__module__.split('.')[0]}.{type(exc).__name__}"
    where = [f"the logs of Prefect flow run {flow_run_id}"] if flow_run_id else []
    try:
        log = error_log()
        log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8") as file:
            file.write(f"--- {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
                       f"{f' flow run {flow_run_id}' if flow_run_id else ''}\n")
            file.write("".join(traceback.format_exception(exc)))
        where.insert(0, str(log))
    except OSError:
        pass
    details = " and in ".join(where) if where else "the Prefect server's logs"
    print(f"guardsync: unexpected error {cause}; its details are in {details}; if it persists, report it with them",
          file=sys.stderr)
    return 1


def skip_final_collection() -> None:
    """Python ends a process with a garbage collection over every object still alive, the
    libraries a run imports included (Prefect, GX, pandas, scipy): 1.2 s of each run here.
    An exit handler that freezes them skips that walk. The other exit handlers (log flushes,
    Prefect's event drain) run all the same, and Python never promised finalizers at exit."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


class _SummaryPrintedByUs(logging.Filter):
    """The command line prints the run's summary itself (tables on a terminal): the flow's log record of
    it stays in the run's log (the API handler sits on the flow-run logger) and off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, SUMMARY_LOG_MARK, False)


class _NoTracebackForExpectedErrors(logging.Filter):
    """On the terminal, an error is its one line; the traceback is only noise there (the Prefect run's logs
    have it, and guardsync's error log for an unexpected one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:  # the API log handler has already sent it; unexpected ones go to the error log too
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:  # the terminal's handlers, below the flow-run logger's API one
        for kind in (_NoTracebackForExpectedErrors, _SummaryPrintedByUs):
            if not any(isinstance(f, kind) for f in handler.filters):
                handler.addFilter(kind())


def _sync(args) -> int:
    return run_flow(load_settings(args.config), dry_run=args.dry_run, full=args.full,
                    allow_mass_deactivation=args.allow_mass_deactivation, config_path=args.config)


def _approve(args) -> int:
    if not args.reason.strip():
        print("guardsync: --reason must say why the plan is approved (it goes into the audit)", file=sys.stderr)
        return 1
    return run_flow(load_settings(args.config), approve_run=args.run_id, approval_reason=args.reason.strip(),
                    config_path=args.config)


def _plan(args) -> int:
    return run_flow(load_settings(args.config), dry_run=True, full=args.full)


def _demo(args) -> int:
    from guardsync.demo import run_demo

    return run_demo(run_flow, users=args.users, workdir=args.workdir, ui=args.ui)


def _history(args) -> int:
    from guardsync.state import StateStore

    store = StateStore(load_settings(args.config).sync.state)
    for run in store.history(args.limit):
        counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items() if v) or "no change"
        print(f"{run['started_at']:%Y-%m-%d %H:%M:%S}  {run['run_id']}  {run['mode']:<7}  {run['status']:<9}  {counts}")
    return 0


def _audit(args) -> int:
    from guardsync.state import StateStore

    store = StateStore(load_settings(args.config).sync.state)
    rows = store.audit_of(args.user)
    if not rows:
        print(f"no recorded write for {args.user}")
    for row in rows:
        print(f"{row['at']:%Y-%m-%d %H:%M:%S}  run {row['run_id']}  {row['operation']:<10} {row['object_type']:<5} "
              f"{row['object_name'] or row['object_id']}  {row['outcome']}" + (f"  {row['detail']}" if row["detail"] else ""))
    return 0


def _init(args) -> int:
    from pathlib import Path

    from guardsync.init_command import InitAnswers, complete_answers, write_config

    answers = InitAnswers(
        tenant_id=args.tenant_id, client_id=args.client_id, client_secret_ref=args.client_secret_ref,
        certificate_path=args.certificate_path, scim_url=args.scim_url, api_key_ref=args.api_key_ref,
        groups=args.group, domains=args.domain, identifier=args.identifier, state=args.state,
        authority_host=args.authority_host, graph_url=args.graph_url,
    )
    output = Path(args.output)
    if output.exists() and not args.force:  # say so before asking anything
        print(f"guardsync: {output} already exists: pass --force to replace it, or --output another file", file=sys.stderr)
        return 1
    default_state = f"sqlite:///{output.absolute().parent / 'guardsync-state.db'}"
    ask = _ask_on_terminal if sys.stdin.isatty() else None
    result = write_config(complete_answers(answers, ask, default_state), output, force=args.force)
    print("\n".join(result.next_steps))
    return 0


def _ask_on_terminal(question: str, default: str) -> str:
    try:
        return input(f"{question}{f' [{default}]' if default else ''}: ")
    except EOFError:
        return ""


def _prefect_secret(name: str) -> str:
    from flows.sync_directory import prefect_secret  # Prefect loads only when a block is named

    return prefect_secret(name)


def _check(args) -> int:
    from guardsync.check import run_checks
    from guardsync.progress import print_checklist

    report = run_checks(args.config, prefect_lookup=_prefect_secret)
    print_checklist(report, sys.stdout)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardsync", description="Provision Atlassian Cloud from Microsoft Entra ID.")
    commands = parser.add_subparsers(dest="command", required=True)

    sync = commands.add_parser("sync", help="one run of the sync-directory flow")
    sync.add_argument("--config", required=True, metavar="FILE")
    sync.add_argument("--dry-run", action="store_true", help="write nothing to Atlassian or the state; print the plan")
    sync.add_argument("--full", action="store_true", help="ignore Graph delta links and re-read everything")
    sync.add_argument("--allow-mass-deactivation", action="store_true",
                      help="this run only: allow more deactivations than [sync] max_deactivations")
    sync.set_defaults(handler=_sync)

    approve = commands.add_parser(
        "approve", help="apply the plan a guard held (a blocked run's), if Entra and Atlassian give that same plan now")
    approve.add_argument("run_id", metavar="RUN_ID", help="the blocked run's id (its output names it)")
    approve.add_argument("--config", required=True, metavar="FILE")
    approve.add_argument("--reason", required=True, help="why: kept in the audit and the summary")
    approve.set_defaults(handler=_approve)

    plan = commands.add_parser("plan", help="same as sync --dry-run")
    plan.add_argument("--config", required=True, metavar="FILE")
    plan.add_argument("--full", action="store_true")
    plan.set_defaults(handler=_plan)

    demo = commands.add_parser("demo", help="the whole job on the built-in sandbox; no credentials, no network")
    demo.add_argument("--users", type=int, default=300, help="size of the generated tenant")
    demo.add_argument("--workdir", default=".guardsync-demo", help="where the demo keeps its config and state")
    demo.add_argument("--ui", action="store_true",
                      help="run against a local Prefect server with its UI, kept up (its address printed) until Ctrl-C")
    demo.set_defaults(handler=_demo)

    history = commands.add_parser("history", help="recent runs with their counts")
    history.add_argument("--config", required=True, metavar="FILE")
    history.add_argument("--limit", type=int, default=20)
    history.set_defaults(handler=_history)

    audit = commands.add_parser("audit", help="every write guardsync made for one user or group")
    audit.add_argument("user", help="userName, group name or Entra object id")
    audit.add_argument("--config", required=True, metavar="FILE")
    audit.set_defaults(handler=_audit)

    init = commands.add_parser("init", help="write a commented configuration file (asks for what is missing on a terminal)")
    init.add_argument("--tenant-id", help="Entra tenant GUID or its *.onmicrosoft.com domain")
    init.add_argument("--client-id", help="application (client) id of the app registration")
    credential = init.add_mutually_exclusive_group()
    credential.add_argument("--client-secret-ref", metavar="REF", help="env:VARIABLE or prefect:SECRET_BLOCK holding the client secret")
    credential.add_argument("--certificate-path", metavar="PEM", help="PEM file with the app's private key and certificate")
    init.add_argument("--scim-url", help="https://api.atlassian.com/scim/directory/DIRECTORY_ID")
    init.add_argument("--api-key-ref", metavar="REF", help="env:VARIABLE or prefect:SECRET_BLOCK holding the SCIM API key")
    init.add_argument("--group", action="append", metavar="NAME", help="a pilot group to sync (repeatable); none: all groups")
    init.add_argument("--domain", action="append", metavar="DOMAIN", help="a domain to sync (repeatable); none: every verified one")
    init.add_argument("--identifier", choices=["upn", "email"])
    init.add_argument("--state", metavar="URL", help="state store, a SQLAlchemy URL (default: a SQLite file next to the output)")
    init.add_argument("--authority-host", help="Entra login host (sovereign clouds); default https://login.microsoftonline.com")
    init.add_argument("--graph-url", help="Microsoft Graph URL (sovereign clouds); default https://graph.microsoft.com")
    init.add_argument("--output", default="guardsync.toml", metavar="FILE", help="where to write (default guardsync.toml)")
    init.add_argument("--force", action="store_true", help="replace FILE if it exists")
    init.set_defaults(handler=_init)

    check = commands.add_parser("check", help="check every prerequisite before a sync; writes nothing")
    check.add_argument("--config", required=True, metavar="FILE")
    check.set_defaults(handler=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except GuardsyncError as exc:
        print(f"guardsync: {plain(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("guardsync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_unexpected(exc)


if __name__ == "__main__":
    sys.exit(main())
