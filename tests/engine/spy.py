"""A spy on the engine's forwards, for the engine's tests."""

from __future__ import annotations

from edgeserve.engine import Engine


def record_forwards(monkeypatch) -> list[tuple[int, set[str], bool]]:
    """(step, model ids, prefill) of each forward the engine runs."""
    seen: list[tuple[int, set[str], bool]] = []
    forward = Engine._forward

    def spy(self, seqs, limit):
        seen.append((self.steps, {s.model.id for s in seqs}, limit > 1))
        return forward(self, seqs, limit)

    monkeypatch.setattr(Engine, "_forward", spy)
    return seen
