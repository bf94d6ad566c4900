"""Per-model demand history: a decayed request rate, bursts, and the period between them.

Requests closer together than `burst_gap` seconds form one burst. When a model's last
bursts started at regular intervals (each within `tolerance` of their median), that
median is its period, and the next burst is predicted one period after the last one
(skipping periods that passed without a burst).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import deque

from edgeserve.eviction import Demand

MIN_INTERVALS = 2       # bursts - 1 needed before a period is trusted
HISTORY = 12            # burst starts kept per model


class DemandHistory(Demand):
    def __init__(self, half_life: float = 120.0, burst_gap: float = 0.5,
                 tolerance: float = 0.25) -> None:
        super().__init__(half_life)
        self.burst_gap, self.tolerance = burst_gap, tolerance
        self.bursts: dict[str, deque[float]] = {}     # model -> start of each burst

    def record(self, model: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        last = self.last.get(model)
        super().record(model, now)
        if last is None or now - last > self.burst_gap:
            self.bursts.setdefault(model, deque(maxlen=HISTORY)).append(now)

    def period(self, model: str) -> float | None:
        """The interval between the model's bursts, if they are regular; else None."""
        starts = list(self.bursts.get(model, ()))
        gaps = [b - a for a, b in itertools.pairwise(starts)][-4:]
        if len(gaps) < MIN_INTERVALS:
            return None
        median = statistics.median(gaps)
        if median <= self.burst_gap or any(abs(g - median) > self.tolerance * median
                                           for g in gaps):
            return None
        return median

    def next_burst(self, model: str, now: float | None = None) -> float | None:
        """When the model's next burst is expected (monotonic seconds), if it is periodic:
        the first multiple of the period after the last burst that is not yet past."""
        period = self.period(model)
        if period is None:
            return None
        now = time.monotonic() if now is None else now
        at = self.bursts[model][-1] + period
        while at + self.tolerance * period < now:
            at += period
        return at

    def models(self) -> list[str]:
        return list(self.bursts)
