"""Request figures over the last minute: time to first token (p50, p95) and tokens/s.

Prometheus histograms hold everything since the start; a person watching the box wants
what happens now. The request path records each first token and each burst of tokens on
the event loop; readers ask for the figures of the last WINDOW seconds.
"""

from __future__ import annotations

import time
from collections import deque

WINDOW = 60.0


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, linearly interpolated."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Recent:
    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.started = time.monotonic()
        self._ttft: deque[tuple[float, float]] = deque()      # (when, seconds)
        self._tokens: deque[list[float]] = deque()            # [second, tokens]

    def first_token(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._ttft.append((now, seconds))
        self._prune(now)

    def tokens(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        second = float(int(now))
        if self._tokens and self._tokens[-1][0] == second:
            self._tokens[-1][1] += n
        else:
            self._tokens.append([second, float(n)])
            self._prune(now)

    def _prune(self, now: float) -> None:
        edge = now - self.window
        while self._ttft and self._ttft[0][0] < edge:
            self._ttft.popleft()
        while self._tokens and self._tokens[0][0] < edge:
            self._tokens.popleft()

    def figures(self, now: float | None = None) -> dict[str, float | int | None]:
        """ttft_p50/p95 in seconds (None without requests), tokens/s, requests seen."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        ttft = sorted(s for _, s in self._ttft)
        span = max(1.0, min(self.window, now - self.started))
        tokens = sum(n for _, n in self._tokens)
        return {"ttft_p50": percentile(ttft, 50) if ttft else None,
                "ttft_p95": percentile(ttft, 95) if ttft else None,
                "tokens_per_s": tokens / span, "requests": len(ttft)}
