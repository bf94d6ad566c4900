"""Residency rules: how long a resident model stays (keep-alive timers, pins).

A model stays resident until unloaded, until its keep-alive runs out with no request
running, or until pool pressure unloads it; a pinned model never leaves. A mixin of
`Scheduler`, which owns the models and unloads them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeserve.engine import Engine
    from edgeserve.model import ResidentModel
    from edgeserve.store import ModelStore

log = logging.getLogger("edgeserve.scheduler")


@dataclass(slots=True)
class Residency:
    """How long a model stays: None = until unloaded or evicted."""

    pinned: bool = False
    keep_alive: float | None = None
    timer: asyncio.TimerHandle | None = None


class Residencies:
    models: dict[str, ResidentModel]
    residency: dict[str, Residency]
    store: ModelStore
    engine: Engine

    if TYPE_CHECKING:
        async def unload(self, model_id: str) -> None: ...

    def pin(self, model_id: str, pinned: bool = True) -> None:
        """A pinned model is never unloaded by keep-alive or evicted."""
        if model_id not in self.models:
            self.store.path(model_id)
        self.residency.setdefault(model_id, Residency()).pinned = pinned
        if not pinned:
            self.request_ended(model_id)      # its keep-alive runs again from now

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """Unload model_id `seconds` after its last request ends; None or < 0: keep."""
        state = self.residency.setdefault(model_id, Residency())
        state.keep_alive = None if seconds is None or seconds < 0 else seconds
        self.request_ended(model_id)

    def request_ended(self, model_id: str) -> None:
        state = self.residency.get(model_id)
        if state is None or state.keep_alive is None or state.pinned:
            return
        if state.timer is not None:
            state.timer.cancel()
        state.timer = asyncio.get_running_loop().call_later(
            state.keep_alive, lambda: asyncio.ensure_future(self._expire(model_id)))

    async def _expire(self, model_id: str) -> None:
        state, model = self.residency.get(model_id), self.models.get(model_id)
        if state is None or model is None or state.pinned or state.keep_alive is None:
            return
        if self.engine.has_sequences(model):
            return                              # the running request re-arms the timer
        log.info("keep-alive of %s ran out", model_id)
        await self.unload(model_id)
