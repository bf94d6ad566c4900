"""Predictive prewarming: load the models predicted to be asked for next, in idle time.

A model whose requests come in regular bursts (demand.py) is loaded shortly before its
next burst is due, while the step thread is idle and no load runs: onto the device that
placement scores best, when it has room or room held only by units of lower value than
the model's: retained units, or idle models (not themselves prewarmed) whose units are
all worth less. A prewarm never evicts a unit worth more than what it brings in: worth
less is a lower decayed rate, or, for periodic models, a next burst that comes only after
the incoming model's (its room is not needed before then). Else the model goes into the
host tier, when that has room without dropping anything.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.blocks.pack import is_task_dir
from edgeserve.demand import DemandHistory
from edgeserve.loader import read_spec
from edgeserve.placement import missing_units
from edgeserve.pool import Unit
from edgeserve.prewarm_host import read_to_host
from edgeserve.tiers import LoadCancelled, ReadOptions

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler

log = logging.getLogger("edgeserve.prewarm")
TICK = 0.05           # seconds between two looks at the demand history
LEAD = 2.0            # prewarm at most this long before a burst is due (or half a period)
RETRY = 0.5           # seconds before a prewarm that found no room is tried again


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
        best = s.placer.placement.choose(scores)
        victims = await s.engine.run(self.room, model_id, needs[best.device], best.device)
        if best.fits and victims is not None:
            with contextlib.suppress(LoadCancelled):
                for victim in victims:
                    ReadOptions(stop=stop).check()
                    await s.unload(victim)
                await s.load(model_id, best.device, stop)
                return best.device
            if stop.is_set():
                raise LoadCancelled("the prewarm yielded")
            return None
        if s.host is None:
            return None
        nbytes = await asyncio.to_thread(read_to_host, s, model_id, path, best.device, stop)
        return "host" if nbytes else None

    def room(self, model_id: str, units: list[tuple[str | None, int]], device: str
             ) -> list[str] | None:
        """(step thread) The idle models to unload so that model_id fits on device, evicting
        only units each worth less (reuse / bandwidth back) than the model's are (its
        demand / disk bandwidth): retained units first, then idle models not prewarmed
        themselves. None when the model cannot fit that way."""
        s = self.s
        pool = s.pools[device]
        missing, keep = missing_units(units, lambda k: pool.lookup(k) is not None, s.host)
        need = sum(pool.blocks_for(m.nbytes) for m in missing) - pool.free_bytes // pool.block_size
        bw = s.ctx.bandwidth
        incoming = s.ctx.demand.score(model_id) / bw["disk"]
        asked_after = self.asked_after(model_id, time.monotonic())

        def cheaper(unit: Unit) -> bool:
            return s.ctx.reuse(unit) / bw[s.ctx.comes_back_from(unit)] < incoming or \
                asked_after(s.ctx.models_of(unit))

        retained = [u for u in pool.policy([u for u in pool.units.values() if u.pins == 0])
                    if u.key is None or u.key not in keep]
        groups = [("", [u]) for u in retained] + [
            (m, [u for u in g if u.key is None or u.key not in keep])
            for m, g in s.placer.idle_units(pool, model_id) if m not in self.pending]
        holders: dict[int, set[str]] = {}
        for m, resident in s.models.items():
            if resident.pool is pool:
                for u in resident.distinct_units:
                    holders.setdefault(u.id, set()).add(m)
        victims: list[str] = []
        freed: set[int] = set()
        for model, group in groups:
            if need <= 0:
                break
            if not all(cheaper(u) for u in group):
                return None
            if model:
                victims.append(model)
            # A unit shared with a model that stays (a base beside its fine-tune) is freed
            # only once every model holding it is a victim.
            for u in group:
                if u.id not in freed and holders.get(u.id, set()) <= set(victims):
                    freed.add(u.id)
                    need -= u.nblocks
        return victims if need <= 0 else None

    def asked_after(self, model_id: str, now: float) -> Callable[[set[str]], bool]:
        """Whether every one of some models is periodic, none has a request waiting, and
        each is next asked for only after model_id's burst: keeping their units serves no
        request before it (Belady's choice), so a prewarm may take their room even when
        their decayed rate is higher. The prewarmer brings them back before their own."""
        history, waiting = self.history, self.s.ctx.waiting
        at = history.next_burst(model_id, now)

        def check(models: set[str]) -> bool:
            if at is None or not models:
                return False
            nexts = [history.next_burst(m, now) for m in models]
            return all(n is not None and n > at + history.burst_gap and not waiting.get(m)
                       for m, n in zip(models, nexts, strict=True))
        return check

    def stats(self) -> dict[str, int | bool]:
        return {"enabled": self.enabled, **self.counts}
