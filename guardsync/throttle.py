"""Adaptive write concurrency: halve on throttling, creep back up after a run of successes (AIMD).

The load starts at [sync] write_concurrency parallel writes. Each 429 from Atlassian
halves the number of writes allowed in flight (never below one); every `recover_after`
successful writes in a row add one back, up to the configured ceiling.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class AdaptiveLimit:
    def __init__(self, ceiling: int, recover_after: int = 50):
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling
        self.recover_after = recover_after
        self.in_flight = 0
        self.lowest = self.ceiling  # for the run's report: how far it had to back off
        self._streak = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._cond:
            while self.in_flight >= self.limit:
                self._cond.wait()
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    def throttled(self) -> None:
        with self._cond:
            self.limit = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            self._streak = 0

    def succeeded(self) -> None:
        with self._cond:
            self._streak += 1
            if self._streak >= self.recover_after and self.limit < self.ceiling:
                self.limit += 1
                self._streak = 0
                self._cond.notify_all()
