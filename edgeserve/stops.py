"""Streamed stop-string matching: text emitted up to the earliest stop string, never past it."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that could be the start of one.

    The emitted text is the full text cut just before the earliest occurrence of any
    stop string. When a stop string is complete but a longer one that started earlier
    is still possible, the decision waits (at most max(len(stop)) - 1 characters).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stop)
        self._prefixes = frozenset(s[:n] for s in self._stops for n in range(1, len(s)))
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found (by push or by flush)."""
        return self._stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed the next piece of text; return (text safe to emit now, stopped)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta  # the held tail is short, so this never rescans much
        cut = self._pending_start(text)
        hit = self._first_stop(text)
        if hit is not None and hit <= cut:
            self._held, self._stopped = "", True
            return text[:hit], True
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """At the end of the stream: the held-back text (up to a stop string, if one is in it)."""
        if self._stopped:
            return ""
        text, self._held = self._held, ""
        hit = self._first_stop(text)
        if hit is not None:
            self._stopped = True
            return text[:hit]
        return text

    def _pending_start(self, text: str) -> int:
        """Start of the longest suffix of text that is a proper prefix of a stop string."""
        for size in range(min(len(text), self._max_held), 0, -1):
            if text[-size:] in self._prefixes:
                return len(text) - size
        return len(text)

    def _first_stop(self, text: str) -> int | None:
        hits = [i for s in self._stops if (i := text.find(s)) >= 0]
        return min(hits, default=None)
