"""Read a py-spy raw profile (collapsed stacks: "frame;frame;... count" a line) into the few numbers that matter."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        match = FRAME.match(frame.strip())
        out.append((match["function"], match["file"]) if match else (frame.strip(), ""))
    return out


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize(path: Path, top: int = 25) -> dict:
    """Top functions by own samples and by inclusive samples; samples per guardsync module and per package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        if not frames:
            continue
        function, file = frames[-1]
        own[f"{function} ({_short(file)})"] += n
        seen = set()
        for function, file in frames:
            key = f"{function} ({_short(file)})"
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
        leaf_file = _short(frames[-1][1])
        packages[leaf_file.split("/", 1)[0] if "/" in leaf_file else leaf_file] += n
    def pct(counter):
        return [(k, round(100 * v / max(total, 1), 1)) for k, v in counter.most_common(top)]

    return {"samples": total, "own_pct": pct(own), "inclusive_pct": pct(inclusive), "package_pct": pct(packages)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(summarize(Path(sys.argv[1])), indent=1))
