"""A load's turn on its device: placed before it waits, so that loads onto different
devices go side by side while loads onto one device take turns (grouping.py), unless a
load fits beside the ones copying there (its units known, none still coming, its bytes in
free memory: `Placer.beside`).

When the turn comes, the load is placed again if the pools changed while it waited
(another load ended or a model was unloaded). If the device chosen then is another one,
the load leaves this device's queue for the other's, at most RECHECKS times; after that
it keeps the turn it holds. An explicit device is never re-placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.task import TaskSource
from edgeserve.placement import Score
from edgeserve.placer import Needs
from edgeserve.pool import BlockPool

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler

RECHECKS = 2     # times a load may move to another device's queue when its turn comes


@dataclass(frozen=True, slots=True)
class Load:
    """What a load needs to be placed: its checkpoint, spec, task and host-only units."""
    model_id: str
    checkpoint: Path
    spec: ModelSpec
    task: TaskSource | None
    host_only: frozenset[str]


@dataclass(frozen=True, slots=True)
class Turn:
    pool: BlockPool
    placement: dict[str, object]
    waited: float       # seconds from queueing to the turn
    beside: bool = False  # it copied beside the load holding the device's turn

    def fields(self) -> dict[str, Any]:
        """What the load report says of its turn."""
        return {"placement": self.placement, "turn_seconds": self.waited,
                "beside": self.beside}


@contextlib.asynccontextmanager
async def placed_turn(s: Scheduler, load: Load, device: str | None, real: bool
                      ) -> AsyncIterator[Turn]:
    """Place the load, wait for its turn on that device, re-place if the pools changed
    meanwhile; yields the pool once the turn is held. Its turn is ranked by the bytes it
    misses on that device. From its turn until it ends, the units it brings count as
    coming to its device when other loads are placed (only then: loads still queued on
    one device may evict each other's units, and are placed again at their turn)."""
    needs = s.placer.queued.get(load.model_id) or await _needs(s, load)
    seen = s.grouping.changes
    chosen, scores = await s.placer.choose(load.model_id, needs, device)
    try:
        async with _turn(s, load, device, real, chosen, scores, needs, seen) as turn:
            yield turn
    finally:
        s.placer.arrived(load.model_id)


@contextlib.asynccontextmanager
async def _turn(s: Scheduler, load: Load, device: str | None, real: bool,
                chosen: Score, scores: list[Score], needs: Needs, seen: int
                ) -> AsyncIterator[Turn]:
    start = time.perf_counter()
    moves = 0
    while True:
        stack = contextlib.AsyncExitStack()
        cost = functools.partial(s.placer.estimate, load.model_id, chosen.device)
        beside = (functools.partial(s.placer.beside, load.model_id, chosen.device)
                  if real and load.task is None and not load.host_only else None)
        shared = await stack.enter_async_context(
            s.grouping.turn(load.model_id, real, cost, chosen.device, beside))
        try:
            # Placed on pools since changed (a load beside the holder was just found to fit)
            if s.grouping.changes != seen and not shared:
                seen = s.grouping.changes
                needs = s.placer.queued[load.model_id] = await _needs(s, load)
                again, scores = await s.placer.choose(load.model_id, needs, device)
                if again.device != chosen.device and moves < RECHECKS:
                    moves += 1
                    chosen = again
                    await stack.aclose()           # to the other device's queue
                    s.placer.arrived(load.model_id)    # (announced there if it went beside)
                    seen = s.grouping.changes      # (leaving the turn counts as a change)
                    continue
                chosen = score_on(scores, chosen.device)
        except BaseException:
            await stack.aclose()
            raise
        break
    async with stack:
        s.placer.queued.pop(load.model_id, None)
        s.placer.arriving(load.model_id, chosen.device, needs)
        pool, placement = s.placer.commit(load.model_id, chosen, scores, device is not None)
        yield Turn(pool, placement, time.perf_counter() - start, shared)


async def _needs(s: Scheduler, load: Load) -> Needs:
    sizes = s.placer.resident_sizes()
    return await asyncio.to_thread(s.placer.needs, load.model_id, load.checkpoint, load.spec,
                                   load.task, load.host_only, sizes)


def score_on(scores: list[Score], device: str) -> Score:
    """device's score: a load keeps the turn it holds."""
    return next(x for x in scores if x.device == device)
