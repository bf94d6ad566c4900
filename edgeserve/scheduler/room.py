"""Making room in a pool: a load's units allocated while idle models are unloaded (waiting
for busy ones), evicted weight units demoted to the host tier first. A mixin of
`Scheduler`, which owns the models."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeserve.arch.spec import ModelSpec
from edgeserve.events import publish
from edgeserve.loader import LoadContext, LoadReport, Prepared, Sources
from edgeserve.pool import BlockPool, PoolFull, Unit, UnitKind
from edgeserve.residency import Residency
from edgeserve.scheduler.loading import prepare_frozen
from edgeserve.tiers import ReadOptions

if TYPE_CHECKING:
    from edgeserve.config import SchedulerConfig
    from edgeserve.engine import Engine
    from edgeserve.eviction import EvictionPolicy, PolicyContext
    from edgeserve.model import ResidentModel
    from edgeserve.tiers import HostTier

log = logging.getLogger("edgeserve.scheduler")
WEIGHT_KINDS = (UnitKind.WEIGHT, UnitKind.EXPERT)   # immutable units worth keeping
BUSY_WAIT = 120.0     # seconds a load waits for busy models to make room
DEMOTE_GAIN = 1.5      # demote to the host tier only if it is this much faster than disk


class RoomMaking:
    models: dict[str, ResidentModel]
    residency: dict[str, Residency]
    engine: Engine
    policy: EvictionPolicy
    ctx: PolicyContext
    host: HostTier | None
    pools: dict[str, BlockPool]
    config: SchedulerConfig

    if TYPE_CHECKING:
        async def unload(self, model_id: str) -> None: ...

    async def _make_room(self, pool: BlockPool, loading: str, deadline: float,
                         error: PoolFull) -> None:
        """Unload one idle model, waiting for a busy one to go idle if need be; re-raises
        PoolFull when nothing could make room."""
        while True:
            victim = self._idle_victim(pool, loading)
            if victim is not None:
                log.info("unloading %s to make room for %s", victim, loading)
                await self.unload(victim)
                return
            if not self._busy(pool, loading) or time.monotonic() > deadline:
                raise error
            await asyncio.sleep(0.005)      # their requests end soon: then unload

    async def _prepare(self, model_id: str, path: Path, spec: ModelSpec, ctx: LoadContext,
                       report: LoadReport, host_only: frozenset[str],
                       stop: threading.Event | None) -> tuple[Prepared, Sources]:
        """Pin and allocate the model's units, unloading idle models while memory is short
        (and waiting for busy ones to go idle, up to BUSY_WAIT seconds; a prewarm never
        unloads). Keys of files never hashed stay unknown unless room runs short."""
        deadline = time.monotonic() + BUSY_WAIT
        sources = await asyncio.to_thread(Sources.scan, path, spec, ctx, model_id,
                                          bool(host_only) or not self.config.first_sight)
        while True:
            ReadOptions(stop=stop).check()
            attempt = replace(report)
            try:
                prepared = await self.engine.run(prepare_frozen, path, spec, ctx, model_id,
                                                 attempt, sources, host_only)
            except PoolFull as e:
                if not sources.known and self.policy.share:   # sharing may make room
                    sources = await asyncio.to_thread(Sources.scan, path, spec, ctx, model_id)
                    continue
                if stop is not None:
                    raise
                waited = time.perf_counter()
                await self._make_room(ctx.pool, model_id, deadline, e)
                report.room_seconds += time.perf_counter() - waited
                continue
            for name in ("bytes_total", "bytes_from_device", "bytes_from_host",
                         "bytes_from_disk"):
                setattr(report, name, getattr(attempt, name))
            return prepared, sources

    def _busy(self, pool: BlockPool, loading: str) -> bool:
        """Models that could make room once their running requests end."""
        return any(model.pool is pool and m != loading
                   and not self.residency.get(m, Residency()).pinned
                   for m, model in self.models.items())

    def _idle_victim(self, pool: BlockPool, loading: str) -> str | None:
        idle = [m for m, model in self.models.items()
                if model.pool is pool and m != loading and not self.engine.has_sequences(model)
                and not self.residency.get(m, Residency()).pinned]
        order = self.policy.model_order(idle, self.ctx)
        return order[0] if order else None

    def _demote(self, unit: Unit) -> None:
        """Before an evicted weight unit's blocks go back: keep its bytes in the host tier,
        when coming back from there beats coming back from disk (else the copy is waste:
        a disk served from the page cache is as fast as the host tier)."""
        bandwidth = self.ctx.bandwidth
        if bandwidth["host"] < DEMOTE_GAIN * bandwidth["disk"]:
            return
        if self.host is not None and unit.key is not None and unit.kind in WEIGHT_KINDS:
            for pool in self.pools.values():
                if pool.units.get(unit.id) is unit:
                    if self.host.put(unit.key, pool.raw(unit)):
                        publish(pool, "demote", unit.owner, unit=unit.id, bytes=unit.nbytes)
                    return

    def _forget_chunk(self, unit: Unit) -> None:
        # Task-block chunks are never reloaded under the same key: drop their users entry.
        if unit.kind is UnitKind.TASK_BLOCK and unit.key is not None:
            self.ctx.users.pop(unit.key, None)
