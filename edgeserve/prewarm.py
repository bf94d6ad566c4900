"""Predictive prewarming: load the models predicted to be asked for next, in idle time.

A model whose requests come in regular bursts (demand.py) is loaded shortly before its
next burst is due, while the step thread is idle and no load runs: onto a device with
room, or room held only by units worth less than the model until its burst (which room,
and which device: prewarm_room.py). A prewarm never evicts a unit worth more than what
it brings in. Else the model goes into the host tier, when that has room without
dropping anything.
A real request preempts a prewarm in progress at once: its reads stop at the next chunk
and what it allocated goes back.

Counted: prewarms, hits (a request found its model prewarmed), wasted (the burst window
passed without a request), cancelled (preempted by a real request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.blocks.pack import is_task_dir
from edgeserve.demand import DemandHistory
from edgeserve.loader import read_spec
from edgeserve.prewarm_host import read_to_host
from edgeserve.prewarm_room import PrewarmRoom
from edgeserve.tiers import LoadCancelled, ReadOptions

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler

log = logging.getLogger("edgeserve.prewarm")
TICK = 0.05           # seconds between two looks at the demand history
LEAD = 2.0            # prewarm at most this long before a burst is due (or half a period)
RETRY = 0.1           # seconds before a prewarm that found no room is tried again


@dataclass(slots=True)
class _Current:
    model: str
    stop: threading.Event
    claimed: bool = False       # a real request joined it: it is no longer cancellable


class Prewarmer:
    def __init__(self, scheduler: Scheduler, enabled: bool = True) -> None:
        self.s, self.enabled = scheduler, enabled
        self.counts = dict.fromkeys(("prewarms", "hits", "wasted", "cancelled"), 0)
        self.pending: dict[str, float] = {}     # prewarmed model -> end of its burst window
        self.tried: dict[str, float] = {}       # model -> when a prewarm last failed
        self.current: _Current | None = None
        self._task: asyncio.Task[None] | None = None
        self.rooms = PrewarmRoom(self)

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.current is not None:
            self.current.stop.set()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except Exception:           # a failed prewarm must not end the loop
                log.exception("prewarm failed")

    @property
    def history(self) -> DemandHistory:
        demand = self.s.ctx.demand
        assert isinstance(demand, DemandHistory)
        return demand

    # ---- real demand -------------------------------------------------------------------
    def real_load(self, model_id: str) -> None:
        """A real request or load: a prewarm of another model yields to it at once."""
        current = self.current
        if current is None:
            return
        if current.model == model_id:
            current.claimed = True
        elif not current.claimed and not current.stop.is_set():
            current.stop.set()
            self.counts["cancelled"] += 1

    def request_started(self, model_id: str) -> None:
        self.real_load(model_id)
        if self.pending.pop(model_id, None) is not None:
            self.counts["hits"] += 1

    # ---- deciding ----------------------------------------------------------------------
    def idle(self) -> bool:
        """Idle time: no running or waiting sequence, no load, no load turn held (also
        store_hashing.py's)."""
        engine = self.s.engine
        return (engine.num_running + engine.num_waiting == 0 and not self.s._loading
                and not self.s.grouping.locked())

    def due(self, now: float) -> list[str]:
        """Models whose next burst is due within the lead time, soonest first, that are
        neither resident nor prewarmed already."""
        demand = self.history
        out = []
        for model in demand.models():
            at = demand.next_burst(model, now)
            period = demand.period(model)
            if at is None or period is None or model in self.s.models or model in self.pending \
                    or now - self.tried.get(model, -math.inf) < RETRY:
                continue
            if at - min(LEAD, period / 2) <= now:
                out.append((at, model))
        return [m for _, m in sorted(out)]

    async def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for model, end in list(self.pending.items()):
            if end < now:
                del self.pending[model]
                self.counts["wasted"] += 1
        if not self.enabled or self.current is not None or not self.idle():
            return
        for model in self.due(now):
            await self.prewarm(model, now)
            return

    async def prewarm(self, model_id: str, now: float | None = None) -> str | None:
        """Prewarm one model now; returns where it went ("cpu:0", "host") or None."""
        now = time.monotonic() if now is None else now
        demand = self.history
        period = demand.period(model_id) or 0.0
        at = demand.next_burst(model_id, now) or now
        current = self.current = _Current(model_id, threading.Event())
        try:
            where = await self._place(model_id, current.stop)
        except LoadCancelled:
            log.info("prewarm of %s yielded to a request", model_id)
            self.tried[model_id] = now
            return None
        finally:
            self.current = None
        if where is None:
            self.tried[model_id] = now
        else:
            self.counts["prewarms"] += 1
            self.pending[model_id] = at + max(period / 2, 1.0)
            log.info("prewarmed %s into %s (next burst in %.2f s)", model_id, where, at - now)
        return where

    async def _place(self, model_id: str, stop: threading.Event) -> str | None:
        s = self.s
        path = s.store.path(model_id)
        if is_task_dir(path):
            return None                 # tasks load in a moment once their base is resident
        spec = await asyncio.to_thread(read_spec, path)
        sizes = await s.engine.run(s.placer.resident_sizes)
        needs = await asyncio.to_thread(s.placer.needs, model_id, path, spec, None, frozenset(),
                                        sizes)
        scores = await s.engine.run(s.placer.scores, model_id, needs)
        room = await s.engine.run(self.rooms.choose, model_id, needs, scores)
        if room is not None:
            with contextlib.suppress(LoadCancelled):
                for victim in room.victims:
                    ReadOptions(stop=stop).check()
                    await s.unload(victim)
                await s.load(model_id, room.device, stop)
                return room.device
            if stop.is_set():
                raise LoadCancelled("the prewarm yielded")
            return None
        if s.host is None:
            return None
        best = s.placer.placement.choose(scores)
        nbytes = await asyncio.to_thread(read_to_host, s, model_id, path, best.device, stop)
        return "host" if nbytes else None

    def stats(self) -> dict[str, int | bool]:
        return {"enabled": self.enabled, **self.counts}
