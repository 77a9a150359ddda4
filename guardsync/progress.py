"""Terminal output for people: progress bars, the summary and plan as tables, the check list.

Everything here looks at the stream it writes to. On an interactive terminal it draws
(rich: bars, tables, colour); anywhere else (CI logs, Prefect workers, a pipe, a file)
it writes plain lines that read well in a log and grep well. rich decides what a
terminal is (`Console.is_interactive`: a TTY that is not TERM=dumb; FORCE_COLOR,
TTY_COMPATIBLE and TTY_INTERACTIVE are honoured), and `force_terminal` overrides it.

No Prefect imports: the loader and the Graph client take a plain callback,
`(stage, done, total) -> None`, which `progress_reporter()` returns.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Callable, Iterable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from guardsync.summary import COUNT_KEYS, IDENTIFIER_FIELD, RunSummary


def console_for(stream: IO[str] | None = None, force_terminal: bool | None = None) -> Console:
    """A rich console on `stream` that never wraps long lines (they are copied from, and grepped)."""
    return Console(file=stream or sys.stdout, force_terminal=force_terminal, highlight=False, soft_wrap=True)


def is_interactive(stream: IO[str] | None = None, force_terminal: bool | None = None) -> bool:
    return console_for(stream, force_terminal).is_interactive


# == progress ======================================================================================


class ProgressReporter:
    """Call it as `(stage, done, total)`; a bar per stage on a terminal, a plain line every `every_percent` % otherwise.

    Thread-safe. On a terminal each stage's bar stays on screen, complete, when the stage
    reaches its total; call `close()` (or use it as a context manager) so a stage that
    stopped early does not leave the live display running.
    """

    def __init__(self, stream: IO[str] | None = None, *, every_percent: int = 10, force_terminal: bool | None = None):
        self._stream = stream  # None: whatever sys.stderr is when it writes (tests swap it, and close theirs)
        self.every_percent = max(1, min(100, every_percent))
        self.console = console_for(self.stream, force_terminal)
        self.draws = self.console.is_interactive
        self._lock = threading.Lock()
        self._printed: dict[str, int] = {}  # stage -> last percent threshold printed (plain mode)
        self._done: dict[str, int] = {}  # stage -> last done seen (plain mode)
        self._stage: str | None = None  # the stage with a live bar (terminal mode)
        self._progress: Progress | None = None
        self._task = None

    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stderr

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            if self.draws:
                self._draw(stage, done, total)
            else:
                self._line(stage, done, total)

    # -- plain lines --------------------------------------------------------------------------
    def _line(self, stage: str, done: int, total: int) -> None:
        finished = total <= 0 or done >= total
        percent = 100 if finished else done * 100 // total
        mark = 100 if finished else percent - percent % self.every_percent  # the last threshold reached
        if done < self._done.get(stage, 0):
            self._printed[stage] = 0  # the stage started again (a retried load): count afresh
        self._done[stage] = done
        if mark > self._printed.get(stage, 0):
            self.stream.write(f"{stage}: {done}/{total} ({percent}%)\n")
            self.stream.flush()
            self._printed[stage] = mark

    # -- bars -----------------------------------------------------------------------------------
    def _draw(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self._stop()
            if total <= 0:
                return
            self._progress = Progress(
                TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TimeRemainingColumn(), console=self.console, auto_refresh=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(escape(stage), total=total)
            self._stage = stage
        self._progress.update(self._task, completed=min(done, total), total=total)
        self._progress.refresh()
        if done >= total:
            self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
        self._progress, self._task, self._stage = None, None, None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_reporter(stream: IO[str] | None = None, *, every_percent: int = 10,
                      force_terminal: bool | None = None) -> ProgressReporter:
    """The `(stage, done, total)` callback for Loader(on_progress=...) and the Graph client; see ProgressReporter."""
    return ProgressReporter(stream, every_percent=every_percent, force_terminal=force_terminal)


def chain(*callbacks: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None]:
    """One progress callback that calls several (e.g. the Prefect progress artifact and the terminal)."""
    live = [callback for callback in callbacks if callback is not None]

    def report(stage: str, done: int, total: int) -> None:
        for callback in live:
            callback(stage, done, total)

    return report


# == summary ======================================================================================


def next_step_lines(summary: RunSummary) -> list[str]:
    """After the first sync: SSO can be set up, with the identifier these accounts use.

    (Groups that need product access are listed by the summary itself.)
    """
    if not (summary.mode == "sync" and summary.status == "completed" and summary.first_sync):
        return []
    field = IDENTIFIER_FIELD.get(summary.identifier, summary.identifier)
    claim = {"upn": "user.userprincipalname", "email": "user.mail"}.get(summary.identifier, field)
    return [f"Next: SSO may now be set up with the identifier these accounts use, {summary.identifier} ({field}): "
            f"in Entra's Atlassian Cloud enterprise application send {claim} as the NameID (Unique User "
            "Identifier) and email claim, then connect it in Atlassian (Security > Identity providers > "
            "your directory > SAML single sign-on)"]


def print_summary_table(summary: RunSummary, stream: IO[str] | None = None, force_terminal: bool | None = None) -> None:
    """The run summary: tables on a terminal, the contract's summary lines elsewhere; then the next steps."""
    console = console_for(stream, force_terminal)
    if not console.is_interactive:
        out = console.file
        out.write("\n".join(summary.lines() + next_step_lines(summary)) + "\n")
        out.flush()
        return
    verb = "would be " if summary.mode == "dry-run" else ""
    title = f"Run {summary.run_id} ({summary.mode}, {summary.status})"
    counts = Table(title=escape(title), title_justify="left", show_edge=False)
    counts.add_column("object")
    counts.add_column(f"{verb}changed" if verb else "change")
    counts.add_column("count", justify="right")
    for key in COUNT_KEYS:
        kind, _, change = key.partition("_")
        value = summary.counts.get(key, 0)
        counts.add_row(kind, change, f"[bold]{value}[/]" if value else "[dim]0[/]")
    console.print(counts)
    set_aside = Table(show_edge=False)
    set_aside.add_column("users set aside")
    set_aside.add_column("reason")
    set_aside.add_column("count", justify="right")
    for label, values in (("excluded", summary.excluded), ("quarantined", summary.quarantined)):
        for reason, value in sorted(values.items()):
            if value:
                set_aside.add_row(label, escape(reason), str(value))
    if set_aside.row_count:
        console.print(set_aside)
    if summary.quarantined_examples:
        console.print("quarantined: " + escape("; ".join(summary.quarantined_examples)))
    console.print(f"identifier: [bold]{summary.identifier}[/] ({IDENTIFIER_FIELD.get(summary.identifier, '?')}); "
                  "SSO must use the same")
    for line in summary.access_lines():  # [access]: grants, per product seats, the email notice
        console.print(escape(line.strip()))
    if summary.new_groups:
        console.print("new groups need product access in Atlassian administration: " + escape(", ".join(summary.new_groups[:20]))
                      + (f" and {len(summary.new_groups) - 20} more" if len(summary.new_groups) > 20 else ""))
    if summary.drift:
        console.print("restored after changes by hand in Atlassian: " + escape("; ".join(summary.drift)))
    if summary.renamed_groups:
        console.print("renamed groups were re-created: grant product access again to " + escape(", ".join(summary.renamed_groups[:20])))
    if summary.failures:
        console.print(f"[red]failed writes: {len(summary.failures)}[/]")
        for line in summary.failures[:20]:
            console.print("  " + escape(line))
    if summary.requests:
        console.print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.requests.items())))
    if summary.message:
        console.print(escape(summary.message))
    for line in next_step_lines(summary):
        console.print(f"[bold]{escape(line)}[/]")


# == plan =========================================================================================


def print_plan_table(counts: dict[str, int] | None, rows: Iterable[dict] = (), stream: IO[str] | None = None,
                     limit: int = 50, force_terminal: bool | None = None, total: int | None = None) -> None:
    """The plan: its counts (None: shown elsewhere), then the first `limit` changes (rows shaped as the
    `plan-changes` artifact: object, change, name, detail, an update's detail naming its attributes
    old -> new). `total` is how many changes the plan has when `rows` holds only the first ones.
    A table on a terminal, plain lines elsewhere."""
    rows = list(rows)
    more = max(total or 0, len(rows)) - min(len(rows), limit)
    console = console_for(stream, force_terminal)
    if not console.is_interactive:
        out = console.file
        if counts is not None:
            out.write("plan: " + (", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no change") + "\n")
        for row in rows[:limit]:
            out.write(f"  {row.get('change', '')} {row.get('object', '')} {row.get('name', '')}"
                      + (f"  {row['detail']}" if row.get("detail") else "") + "\n")
        if more:
            out.write(f"  and {more} more changes (all of them: the plan-changes artifact)\n")
        out.flush()
        return
    if counts is not None:
        table = Table(title="Plan", title_justify="left", show_edge=False)
        table.add_column("change")
        table.add_column("count", justify="right")
        for key, value in counts.items():
            table.add_row(key.replace("_", " "), f"[bold]{value}[/]" if value else "[dim]0[/]")
        console.print(table)
    if rows:
        changes = Table(title=None if counts is not None else "Planned changes", title_justify="left", show_edge=False)
        for column in ("object", "change", "name", "detail"):
            changes.add_column(column)
        for row in rows[:limit]:
            changes.add_row(*(escape(str(row.get(column, ""))) for column in ("object", "change", "name", "detail")))
        console.print(changes)
    if more:
        console.print(f"and {more} more changes (all of them: the plan-changes artifact)")


# == check list =====================================================================================

_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


def print_checklist(report, stream: IO[str] | None = None, force_terminal: bool | None = None) -> None:
    """`guardsync check`: one PASS/FAIL/SKIP line per item, the fix under each FAIL, then the verdict."""
    console = console_for(stream, force_terminal)
    width = max(len(result.item) for result in report.results)
    for result in report.results:
        status = result.status.value
        marker = f"[{_STYLE[status]}]{status}[/]" if console.is_terminal else status
        console.print(f"{marker}  {escape(result.item.ljust(width))}  {escape(result.detail)}")
        if result.fix:
            console.print(f"{'':4}  {'':{width}}  fix: {escape(result.fix)}")
    counts = {status.value: count for status, count in report.counts().items()}  # by name: the check command sits above
    verdict = (f"{len(report.results)} checks: {counts['PASS']} passed, {counts['FAIL']} failed, "
               f"{counts['SKIP']} not checked")
    if report.passed:
        console.print(f"{verdict}. Ready: next, guardsync plan --config {escape(report.source)}")
    else:
        console.print(f"{verdict}. Fix the FAIL lines and run guardsync check --config {escape(report.source)} again.")
