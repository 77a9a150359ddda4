"""Markdown tables of benchmark results: `python -m bench.report bench-results/10k-*.json ...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ["extract", "flatten", "scope", "validate", "plan", "load-users", "load-groups", "load-memberships"]


def _s(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(results: list[dict]) -> str:
    lines = [
        "| scenario | run | Graph made / min | SCIM made / min | made / min | wall s | Prefect start-up s | "
        + " | ".join(STAGES) + " | CPU s | peak RSS MB | sandbox CPU s | state |",
        "|" + "---|" * (11 + len(STAGES)),
    ]
    for result in results:
        for r in result["runs"]:
            q = r["requests"]
            stages = " | ".join(_s(r["stages"].get(name, {}).get("wall_s"), 2) for name in STAGES)
            lines.append(
                f"| {result['scenario']['name']} | {r['run']} | {q['graph_made_total']} / {q['graph_minimum_total']} | "
                f"{q['scim_made_total']} / {q['scim_writes_minimum']} | {q['ratio']} | {_s(r['wall_s'])} | "
                f"{_s(r['prefect_startup_s'])} | {stages} | {_s(r['cpu_s'])} | {_s(r['max_rss_mb'], 0)} | "
                f"{_s(r['sandbox_cpu_s'])} | {'ok' if r['verified'].get('ok') else 'WRONG' if r['verified'].get('ok') is False else '-'} |"
            )
    lines += ["", "| scenario | run | target | measured | met |", "|---|---|---|---|---|"]
    for result in results:
        for r in result["runs"]:
            for name, t in r["targets"].items():
                met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
                lines.append(f"| {result['scenario']['name']} | {r['run']} | {name}: {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
