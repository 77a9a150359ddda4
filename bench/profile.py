"""Read a py-spy raw profile (collapsed stacks: "frame;frame;... count" a line) into where the time goes.

Samples are attributed to a stage: the loader's or Graph reader's worker threads, else
the first frame in tasks/ (a Prefect task's body: extract, flatten, ...), else the flow
body (flows/), else Prefect or start-up.
Within each stage, the functions with the most samples of their own.

    python -m bench.profile bench-results/work/<run>/profile-initial.txt
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        match = FRAME.match(frame.strip())
        out.append((match["function"], match["file"]) if match else (frame.strip(), ""))
    return out


def _stage(frames: list[tuple[str, str]]) -> str:
    # Worker threads carry no task frame: name them by the code they run.
    if any(function.startswith("Loader._each") for function, _ in frames):
        return "loader threads (SCIM requests and their records)"
    if any(file == "guardsync/graph.py" for _, file in frames) and not any(file.startswith("tasks/") for _, file in frames):
        return "Graph reader threads"
    for function, file in frames:
        if file.startswith("tasks/") and function not in ("", "<module>"):
            return function
    if any(function == "Task.__call__" for function, _ in frames):
        return "prefect task engine (around task bodies: results, states)"
    if any(file.startswith("flows/") for _, file in frames):
        return "flow body (outside tasks)"
    if any("prefect/" in file for _, file in frames):
        return "prefect (start-up, engine, API)"
    return "start-up and other"


def _area(file: str) -> str:
    """guardsync/x.py stays whole; a package is its top folder; the stdlib is 'stdlib'."""
    if file.startswith(("guardsync/", "tasks/", "flows/", "bench/")):
        return file
    if "/" in file:
        return file.split("/", 1)[0]
    return "stdlib" if file.endswith(".py") or file.startswith("<") else file or "native"


def summarize(path: Path, top: int = 12) -> dict:
    """Per stage: share of all samples and top own functions; overall: top own functions and areas."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    stage_own: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        n = int(count)
        frames = _frames(stack)
        total += n
        function, file = frames[-1]
        key = f"{function} ({file})"
        stage = _stage(frames)
        own[key] += n
        areas[_area(file)] += n
        stages[stage] += n
        stage_own[stage][key] += n

    def pct(counter: Counter, k: int = top) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in counter.most_common(k)]

    return {
        "samples": total,
        "stages_pct": pct(stages, 50),
        "top_own_pct": pct(own),
        "areas_pct": pct(areas),
        "per_stage_top_own_pct": {stage: pct(stage_own[stage], 8) for stage, _ in stages.most_common()},
    }


def render(summary: dict) -> str:
    lines = [f"{summary['samples']} samples (CPU-busy threads only)", "", "by stage:"]
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in summary["stages_pct"]]
    lines += ["", "by area (file or package of the running function):"]
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in summary["areas_pct"]]
    for stage, rows in summary["per_stage_top_own_pct"].items():
        lines += ["", f"{stage}:"] + [f"  {pct:5.1f}%  {name}" for name, pct in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(render(summarize(Path(sys.argv[1]))))
