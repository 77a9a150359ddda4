"""Gates: run the Great Expectations suites in `expectations/` over the frames of a run.

Each suite is a GX 1.x ExpectationSuite kept as JSON (``name``, ``expectations``
with ``type``, ``kwargs``, ``meta``, ``severity``) and read from disk on every run,
so editing the JSON changes the gate without a code change. What a failed
expectation does depends on its ``severity``:

- ``critical``: blocks the load (``GateResult.blocking``; the caller raises
  ``GuardsyncBlocked`` with ``blocked_message``);
- ``warning``: quarantines the offending rows (``GateResult.quarantined_ids``),
  the rest goes on;
- ``info``: only reported.

A ``warning`` whose ``meta.on_failure`` is ``"drop_value"`` quarantines no row: the
offending rows keep going, without the value of the expectation's column
(``GateResult.dropped_values``), e.g. a time zone Atlassian would refuse.

``meta.rule`` names the rule (snake_case) and ``meta.advice`` tells the operator
what to do; ``{name}`` in the advice is filled from the run's suite parameters
(e.g. ``{max_group_size}``). A suite that does not parse, is not shaped like a
suite, names an unknown expectation, has invalid kwargs, refers to a parameter the
run does not pass, or whose expectation raises while validating (a column that
does not exist, ...) is a broken suite: ``GuardsyncError`` (exit 1), never a pass
and never a data block.

Only row-level (map) expectations name offending rows; a failed aggregate or table
expectation (e.g. a row count) reports but quarantines nothing. An expectation that
passes thanks to ``mostly`` still lists its offending rows but quarantines none.

No Prefect here; GX is imported on first use (it takes seconds) and one ephemeral
context is kept per process. Offending rows come back from GX as row positions and
are turned into ids with numpy: asking GX for ``unexpected_index_column_names``
makes it fetch every cell one by one (9 s for 200,000 offending rows of 500,000).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from guardsync.errors import GuardsyncError

#: The repository's suites; GUARDSYNC_EXPECTATIONS points elsewhere (read at import
#: time here, and again on every call that does not pass `directory`).
DEFAULT_EXPECTATIONS_DIR = Path(__file__).resolve().parent.parent / "expectations"
EXPECTATIONS_DIR = Path(os.environ.get("GUARDSYNC_EXPECTATIONS") or DEFAULT_EXPECTATIONS_DIR)

#: Columns that identify a row of each gated frame (their values are the ids of
#: offending rows). Memberships use both columns, joined as "group_id/user_id".
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id",),
    "groups": ("id",),
    "memberships": ("group_id", "user_id"),
}
#: A column that names a row for people, shown next to its id in messages when present.
LABEL_COLUMNS: dict[str, str] = {"users": "display_name", "groups": "display_name"}

SEVERITIES = ("critical", "warning", "info")
MAX_EXAMPLES = 20
MISSING = "(missing)"  # how a null value or key is shown to people

_EXPECTATION_KEYS = {"type", "kwargs", "meta", "severity", "id", "notes", "description", "rendered_content"}
_SUITE_KEYS = {"name", "expectations", "meta", "notes", "id"}
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ExpectationOutcome:
    """What one expectation of a suite found."""

    suite: str  # "users"
    rule: str  # meta.rule, or the expectation type
    expectation: str  # GX type, e.g. "expect_column_values_to_not_be_null"
    column: str | None  # the column, or "a,b" for a compound expectation; None for table-level
    severity: str  # critical | warning | info
    success: bool
    failed_count: int
    failed_ids: tuple[str, ...]  # key of ALL offending rows (users/groups: id; memberships: "group_id/user_id")
    examples: tuple[str, ...]  # the first 20 offending values, for people
    advice: str
    labels: tuple[str, ...] = ()  # display names of the first 20 offending rows ("" when none), aligned with examples
    drops_value: bool = False  # meta.on_failure "drop_value": the rows go on without this column's value

    @property
    def quarantines(self) -> bool:
        """A failed warning that sets its offending rows aside (not one that only drops a value)."""
        return self.severity == "warning" and not self.success and not self.drops_value


@dataclass(frozen=True)
class GateResult:
    """All outcomes of one suite over one frame."""

    suite: str
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def blocking(self) -> list[ExpectationOutcome]:
        """Failed critical expectations: any of them blocks the load."""
        return [o for o in self.outcomes if o.severity == "critical" and not o.success]

    @property
    def quarantined_ids(self) -> frozenset[str]:
        """Ids of rows offending a failed warning expectation: set these rows aside."""
        return frozenset(i for o in self.outcomes if o.quarantines for i in o.failed_ids)

    @property
    def passed(self) -> bool:
        return all(o.success for o in self.outcomes)

    def quarantined_by_rule(self) -> dict[str, frozenset[str]]:
        """rule -> ids it quarantines (a row can appear under several rules)."""
        out: dict[str, set[str]] = {}
        for o in self.outcomes:
            if o.quarantines:
                out.setdefault(o.rule, set()).update(o.failed_ids)
        return {rule: frozenset(ids) for rule, ids in out.items()}

    def dropped_values(self) -> dict[str, frozenset[str]]:
        """column -> ids of rows whose value in it is dropped (failed drop_value warnings)."""
        out: dict[str, set[str]] = {}
        for o in self.outcomes:
            if o.drops_value and o.severity == "warning" and not o.success and o.column:
                out.setdefault(o.column, set()).update(o.failed_ids)
        return {column: frozenset(ids) for column, ids in out.items()}


# --------------------------------------------------------------------------- suites


def expectations_dir() -> Path:
    """The suites' folder now: GUARDSYNC_EXPECTATIONS, else the repository's expectations/."""
    return Path(os.environ.get("GUARDSYNC_EXPECTATIONS") or DEFAULT_EXPECTATIONS_DIR)


def suite_path(name: str, directory: Path | None = None) -> Path:
    return Path(directory if directory is not None else expectations_dir()) / f"{name}.json"


def load_suite(name: str, directory: Path | None = None) -> dict:
    """Read and check `{directory}/{name}.json`; GuardsyncError naming the file and the fix."""
    path = suite_path(name, directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GuardsyncError(
            f"expectation suite {path} not found; restore it from the repository, or set "
            f"GUARDSYNC_EXPECTATIONS to the folder holding users.json, groups.json and memberships.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardsyncError(f"expectation suite {path} cannot be read ({exc}); fix the file or its permissions") from None
    try:
        suite = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GuardsyncError(
            f"expectation suite {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"fix the file or restore it from the repository"
        ) from None
    _check_structure(suite, path)
    return suite


def _check_structure(suite: Any, path: Path) -> None:
    def bad(what: str) -> GuardsyncError:
        return GuardsyncError(f"expectation suite {path} is invalid: {what}; fix the file or restore it from the repository")

    if not isinstance(suite, dict):
        raise bad("the top level must be an object with 'name' and 'expectations'")
    unknown = set(suite) - _SUITE_KEYS
    if unknown:
        raise bad(f"unknown top-level key(s) {', '.join(sorted(unknown))}")
    if not isinstance(suite.get("name"), str) or not suite["name"].strip():
        raise bad("'name' must be a non-empty string")
    expectations = suite.get("expectations")
    if not isinstance(expectations, list):
        raise bad("'expectations' must be a list")
    get_expectation_impl = _Gx.get().get_expectation_impl

    for number, exp in enumerate(expectations, start=1):
        where = f"expectation #{number}"
        if not isinstance(exp, dict):
            raise bad(f"{where} must be an object with 'type', 'kwargs', 'meta', 'severity'")
        unknown = set(exp) - _EXPECTATION_KEYS
        if unknown:
            raise bad(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
        kind = exp.get("type")
        if not isinstance(kind, str) or not kind:
            raise bad(f"{where} needs 'type' (a GX expectation name such as expect_column_values_to_not_be_null)")
        where = f"{where} ({kind})"
        try:
            get_expectation_impl(kind)
        except Exception:  # GX: ExpectationNotFoundError
            raise bad(f"{where}: GX has no expectation of that type; check the spelling") from None
        if not isinstance(exp.get("kwargs"), dict):
            raise bad(f"{where} needs 'kwargs' (an object)")
        meta = exp.get("meta", {})
        if not isinstance(meta, dict):
            raise bad(f"{where}: 'meta' must be an object")
        for key in ("rule", "advice"):
            if key in meta and not isinstance(meta[key], str):
                raise bad(f"{where}: meta.{key} must be a string")
        if meta.get("on_failure", "drop_value") != "drop_value":
            raise bad(f"{where}: meta.on_failure can only be \"drop_value\" (or left out)")
        if meta.get("on_failure") and "column" not in exp.get("kwargs", {}):
            raise bad(f"{where}: meta.on_failure drop_value needs a column expectation (kwargs.column)")
        if exp.get("severity") not in SEVERITIES:
            raise bad(f"{where}: 'severity' must be one of {', '.join(SEVERITIES)} (got {exp.get('severity')!r})")


def _parameter_names(value: Any) -> set[str]:
    """Names used as {"$PARAMETER": name} anywhere in kwargs."""
    if isinstance(value, dict):
        if set(value) == {"$PARAMETER"} and isinstance(value["$PARAMETER"], str):
            return {value["$PARAMETER"]}
        return set().union(*(_parameter_names(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_parameter_names(v) for v in value)) if value else set()
    return set()


def _build_suite(suite: dict, path: Path, parameters: dict):
    """A GX ExpectationSuite, each expectation carrying an id that maps its result back."""
    gx = _Gx.get()
    ExpectationSuite, ExpectationConfiguration = gx.ExpectationSuite, gx.ExpectationConfiguration  # noqa: N806

    configs = []
    ids: list[str] = []
    for number, exp in enumerate(suite["expectations"], start=1):
        kind = exp["type"]
        missing = sorted(n for n in _parameter_names(exp["kwargs"]) if _PARAMETER_NAME.fullmatch(n) and n not in parameters)
        if missing:
            given = ", ".join(sorted(parameters)) or "none"
            raise GuardsyncError(
                f"expectation suite {path}: {kind} needs the suite parameter(s) {', '.join(missing)}, "
                f"which this run does not pass (it passes: {given}); use one of those or remove the parameter"
            )
        exp_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{path}#{number}"))
        try:
            config = ExpectationConfiguration(
                type=kind,
                kwargs=copy.deepcopy(exp["kwargs"]),
                meta=copy.deepcopy(exp.get("meta") or {}),
                severity=exp["severity"],
                id=exp_id,
            )
            config.to_domain_obj()  # checks the kwargs (pydantic) with a precise message
        except Exception as exc:  # a missing or invalid kwarg
            raise GuardsyncError(
                f"expectation suite {path}: expectation #{number} ({kind}) is invalid: {_one_line(exc)}; fix its kwargs"
            ) from None
        configs.append(config)
        ids.append(exp_id)
    gx_suite = ExpectationSuite(name=suite["name"], expectations=configs)
    if [e.id for e in gx_suite.expectations] != ids:  # GX drops (and only logs) what it cannot build
        raise GuardsyncError(f"expectation suite {path}: GX could not build every expectation; fix the suite")
    return gx_suite, ids


# --------------------------------------------------------------------------- GX context


class _Gx:
    """One ephemeral GX context per process, with a pandas whole-dataframe batch definition.

    Every GX import happens here, under the lock: two threads importing GX at once (the
    warm-up and a gate) would see half-initialised modules.
    """

    _lock = threading.RLock()
    _instance: _Gx | None = None

    def __init__(self) -> None:
        # GX 1.x reads GX_ANALYTICS_ENABLED when the config leaves analytics unset; set both.
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx  # noqa: PLC0415 (slow import: only when a gate runs)
        from great_expectations.core.expectation_suite import ExpectationSuite  # noqa: PLC0415
        from great_expectations.data_context.types.base import (  # noqa: PLC0415
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration  # noqa: PLC0415
        from great_expectations.expectations.registry import get_expectation_impl  # noqa: PLC0415

        self.ExpectationSuite, self.ExpectationConfiguration = ExpectationSuite, ExpectationConfiguration
        self.get_expectation_impl = get_expectation_impl

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        asset = self.context.data_sources.add_pandas("guardsync").add_dataframe_asset("frame")
        self.batch_definition = asset.add_batch_definition_whole_dataframe("whole frame")

    @classmethod
    def get(cls) -> _Gx:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def warm_up_in_background() -> None:
    """Import GX and make its context (seconds of work) in a thread of its own, so that a
    long Graph read hides it; the first gate then finds it ready (or waits for it)."""

    def warm_up() -> None:
        try:
            _Gx.get()
        except Exception:  # noqa: BLE001 -- the first gate makes it again and reports the error
            pass

    threading.Thread(target=warm_up, name="gx-warm-up", daemon=True).start()


# --------------------------------------------------------------------------- running a gate


def run_gate(
    name: str,
    frame: pd.DataFrame,
    parameters: dict | None = None,
    directory: Path | None = None,
    key_columns: tuple[str, ...] | None = None,
) -> GateResult:
    """Validate `frame` against suite `name`; the outcomes say what blocks and what is quarantined.

    `parameters` fill {"$PARAMETER": name} in the suite's kwargs and {name} in its advice.
    `directory` defaults to expectations_dir(); `key_columns` to KEY_COLUMNS[name].
    """
    parameters = dict(parameters or {})
    path = suite_path(name, directory)
    suite = load_suite(name, directory)
    keys = tuple(key_columns or KEY_COLUMNS.get(name, ()))
    if not keys:
        raise GuardsyncError(f"gate {name!r}: no key columns known; pass key_columns (known gates: {', '.join(KEY_COLUMNS)})")
    absent = [k for k in keys if k not in frame.columns]
    if absent:
        raise GuardsyncError(
            f"gate {name!r}: the frame lacks key column(s) {', '.join(absent)} (it has {', '.join(map(str, frame.columns))})"
        )
    label = LABEL_COLUMNS.get(name) if key_columns is None else None
    label = label if label in frame.columns and label not in keys else None

    gx_suite, ids = _build_suite(suite, path, parameters)
    if not ids:
        return GateResult(suite["name"], ())
    # Row labels 0..n-1, unnamed: GX then reports offending rows as positions (see _Rows).
    data = frame.reset_index(drop=True)
    # COMPLETE lists every offending row; no unexpected_index_column_names (slow, see above).
    result_format = {"result_format": "COMPLETE", "partial_unexpected_count": MAX_EXAMPLES}
    gx = _Gx.get()
    try:
        with _Gx._lock:
            batch = gx.batch_definition.get_batch(batch_parameters={"dataframe": data})
            validation = batch.validate(gx_suite, result_format=result_format, expectation_parameters=parameters)
    except GuardsyncError:
        raise
    except Exception as exc:
        raise GuardsyncError(f"expectation suite {path} could not run: {_one_line(exc)}; fix the suite") from exc

    by_id = {r.expectation_config.id: r for r in validation.results}
    broken = []
    for number, (exp_id, exp) in enumerate(zip(ids, suite["expectations"]), start=1):
        r = by_id.get(exp_id)
        if r is None:
            broken.append(f"expectation #{number} ({exp['type']}): GX returned no result")
        elif (message := _raised(r.exception_info)) is not None:
            broken.append(f"expectation #{number} ({exp['type']}): {message}")
    if broken:
        raise GuardsyncError(f"expectation suite {path} is broken: {'; '.join(broken)}; fix the suite (this is not a data problem)")

    rows = _Rows(data, keys, label)
    outcomes = tuple(
        _outcome(suite["name"], exp, by_id[exp_id], rows, parameters) for exp_id, exp in zip(ids, suite["expectations"])
    )
    return GateResult(suite["name"], outcomes)


def _raised(exception_info: Any) -> str | None:
    """GX's message when the expectation itself raised; None when it ran.

    exception_info is either {"raised_exception": bool, "exception_message": ...} or,
    when a metric failed, a dict of those keyed by metric id.
    """
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    messages = [
        _one_line(info.get("exception_message") or "an exception without a message")
        for info in infos
        if isinstance(info, dict) and info.get("raised_exception")
    ]
    return "; ".join(dict.fromkeys(messages)) if messages else None


class _Rows:
    """Looks rows of the validated frame up by position: their ids, values and names."""

    def __init__(self, data: pd.DataFrame, keys: tuple[str, ...], label: str | None):
        self.data, self.keys, self.label = data, keys, label
        self._ids: np.ndarray | None = None

    def ids(self, positions: np.ndarray) -> tuple[str, ...]:
        if self._ids is None:  # rendered once per gate, only when some expectation failed
            parts = [self.data[k].astype(object).where(self.data[k].notna(), MISSING).astype(str) for k in self.keys]
            joined = parts[0]
            for part in parts[1:]:
                joined = joined + "/" + part
            self._ids = joined.to_numpy(dtype=object)
        return tuple(self._ids[positions].tolist())

    def values(self, positions: np.ndarray, columns: list[str]) -> tuple[str, ...]:
        columns = [c for c in columns if c in self.data.columns]
        if not columns:
            return ()
        head = self.data.iloc[positions][columns]
        return tuple("/".join(_text(v) for v in row) for row in head.itertuples(index=False, name=None))

    def labels(self, positions: np.ndarray) -> tuple[str, ...]:
        if not self.label:
            return ()
        return tuple(_text(v, missing="") for v in self.data[self.label].iloc[positions])


def _positions(result: dict, size: int) -> np.ndarray | None:
    """Row positions of the offending rows (GX's unexpected_index_list), or None if it has none."""
    listed = result.get("unexpected_index_list")
    if not listed:
        return None
    try:
        positions = np.asarray(listed, dtype=np.int64)
    except (TypeError, ValueError):
        return None
    if positions.ndim != 1 or (positions.size and (positions.min() < 0 or positions.max() >= size)):
        return None
    return positions


def _outcome(suite_name: str, exp: dict, r: Any, rows: _Rows, parameters: dict) -> ExpectationOutcome:
    kwargs = exp["kwargs"]
    meta = exp.get("meta") or {}
    if "column" in kwargs:
        domain = [kwargs["column"]]
    elif "column_A" in kwargs and "column_B" in kwargs:
        domain = [kwargs["column_A"], kwargs["column_B"]]
    else:
        domain = list(kwargs.get("column_list") or [])
    result = r.result or {}
    positions = _positions(result, len(rows.data)) if not r.success or result.get("unexpected_count") else None
    if positions is not None:
        head = positions[:MAX_EXAMPLES]
        failed_ids = rows.ids(positions)
        examples = rows.values(head, domain) or tuple(_text(v) for v in (result.get("unexpected_list") or [])[:MAX_EXAMPLES])
        labels = rows.labels(head)
    else:  # table-level or aggregate expectations (no offending rows), or nothing failed
        failed_ids, labels = (), ()
        values = result.get("unexpected_list") or result.get("partial_unexpected_list") or []
        examples = tuple(_text(v) for v in values[:MAX_EXAMPLES])
        if not values and not r.success and "observed_value" in result:
            examples = (_text(result["observed_value"]),)
    failed_count = result.get("unexpected_count")
    if failed_count is None:
        failed_count = len(failed_ids) if failed_ids else (0 if r.success else 1)
    return ExpectationOutcome(
        suite=suite_name,
        rule=meta.get("rule") or exp["type"],
        expectation=exp["type"],
        column=",".join(map(str, domain)) or None,
        severity=exp["severity"],
        success=bool(r.success),
        failed_count=int(failed_count),
        failed_ids=failed_ids,
        examples=examples,
        advice=_fill(meta.get("advice") or "", parameters),
        labels=labels,
        drops_value=meta.get("on_failure") == "drop_value",
    )


def _text(value: Any, missing: str = MISSING) -> str:
    if value is None or value is pd.NA or value is pd.NaT:
        return missing
    if isinstance(value, float) and math.isnan(value):
        return missing
    if isinstance(value, dict):
        return "/".join(_text(v, missing) for v in value.values())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _fill(advice: str, parameters: dict) -> str:
    """Replace {name} with the parameter's value; leave other braces alone."""
    for key, value in parameters.items():
        advice = advice.replace("{" + str(key) + "}", str(value))
    return advice


def _one_line(exc: Any) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- messages


def blocked_message(result: GateResult) -> str:
    """For people: one paragraph per failed critical expectation (rule, first 20 offenders, count, advice)."""
    paragraphs = []
    for o in result.blocking:
        where = f" on {o.column}" if o.column else ""
        lines = [f"{result.suite} gate, rule {o.rule} ({o.expectation}{where}): {o.failed_count} offending row(s)."]
        shown = []
        for i, example in enumerate(o.examples[:MAX_EXAMPLES]):
            row_id = o.failed_ids[i] if i < len(o.failed_ids) else ""
            name = o.labels[i] if i < len(o.labels) else ""
            who = " ".join(part for part in (f'"{name}"' if name else "", f"id {row_id}" if row_id else "") if part)
            shown.append(f"{who}: {example}" if who else example)
        if shown:
            more = o.failed_count - len(shown)
            tail = f" ... and {more} more ({o.failed_count} in total)" if more > 0 else f" ({o.failed_count} in total)"
            lines.append("First offenders: " + "; ".join(shown) + tail + ".")
        if o.advice:
            lines.append(f"What to do: {o.advice}")
        paragraphs.append(" ".join(lines))
    return "\n\n".join(paragraphs)
