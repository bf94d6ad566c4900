"""Making room in a pool: idle models unloaded (waiting for busy ones), and evicted weight
units demoted to the host tier first. A mixin of `Scheduler`, which owns the models."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from edgeserve.events import publish
from edgeserve.pool import BlockPool, PoolFull, Unit, UnitKind
from edgeserve.residency import Residency

if TYPE_CHECKING:
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
