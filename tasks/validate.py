"""Stage 4: the Great Expectations gates. Critical failures block the run; warnings quarantine."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from guardsync.config import SyncSettings
from guardsync.errors import GuardsyncBlocked
from guardsync.scope import Scoped
from guardsync.text import md_rows
from guardsync.validate import Validated, validate
from tasks.common import RECOMPUTED


@task(name="validate", **RECOMPUTED)
def validate_gates(scoped: Scoped, sync: SyncSettings) -> Validated:
    validated = validate(scoped, sync.max_group_size)
    rows = [
        {
            "suite": outcome.suite,
            "rule": outcome.rule,
            "severity": outcome.severity,
            "result": _result(outcome),
            "failed rows": outcome.failed_count,
            "examples": ", ".join(outcome.examples[:5]),
            "advice": "" if outcome.success else outcome.advice,
        }
        for result in validated.results
        for outcome in result.outcomes
    ]
    create_table_artifact(key="gate-results", table=md_rows(rows), description="Great Expectations gates of this run")
    logger = get_run_logger()
    for rule, count in validated.quarantined_by_rule().items():
        logger.warning("quarantined %d users by %s", count, rule)
    for attribute, count in validated.values_left_out.items():
        logger.warning("%d users sync without their %s: Atlassian would refuse the value (see the gate results)", count, attribute)
    if validated.blocking:
        first = validated.blocking[0].blocking[0]
        raise GuardsyncBlocked(first.rule, validated.blocked_message(), "")
    return validated


def _result(outcome) -> str:
    if outcome.success:
        return "pass"
    if outcome.severity == "critical":
        return "BLOCK"
    return "value left out" if outcome.drops_value else ("quarantine" if outcome.severity == "warning" else "report")
