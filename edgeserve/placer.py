"""Placement for one load: what the model needs on each device, scored on the step thread.

The scheduler asks `Placer.choose` for a device before a load waits its turn on that
device (and again when the turn comes, if the pools changed meanwhile). What the model is made of
(content keys per unit, for each device's compute dtype; a task's blocks too) is read off
the event loop; the scores are computed on the step thread, where the pools, the queues
and the resident models hold still.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.arena import TileArena
from edgeserve.blocks.task import TaskSource
from edgeserve.first_sight import worth_a_pass
from edgeserve.loader import LoadReport, Sources
from edgeserve.placement import EWMA, Placement, Score, missing_units, report
from edgeserve.pool import BlockPool, Unit, UnitKind
from edgeserve.quant.units import unit_nbytes
from edgeserve.results import InvalidRequest

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler

log = logging.getLogger("edgeserve.placement")
Needs = dict[str, list[tuple[str | None, int]]]       # device -> (content key, bytes) per unit
MEASURE_MIN = 8 << 20  # bytes a load must move from a tier to measure its bandwidth
# The most of its bytes a load beside another may lack: one that finds most of its units
# resident (a fine-tune of a resident base) costs its fixed steps, which run side by side;
# one that moves most of its bytes would only split the bandwidth with the load it joins.
BESIDE_SHARE = 0.5


class Placer:
    def __init__(self, scheduler: Scheduler, step_seconds: float,
                 rule: str = "affinity") -> None:
        self.s = scheduler
        self.placement = Placement(scheduler.ctx, step_seconds)
        self.rule = rule            # "affinity"; baselines: "most-free", "round-robin"
        self._turn = itertools.count()
        self.queued: dict[str, Needs] = {}     # loads waiting their turn: what they need
        # loads in their turn: model -> (device, every content key they need there, the
        # units they lacked: unknown keys as None)
        self.bringing: dict[str, tuple[str, frozenset[str], list[tuple[str | None, int]]]] = {}

    def learn(self, report: LoadReport, seconds: dict[str, float]) -> None:
        """Each tier's bandwidth from real loads (moving averages): per device for
        placement, and overall for the eviction policy."""
        for tier, nbytes in (("host", report.bytes_from_host), ("disk", report.bytes_from_disk)):
            if nbytes >= MEASURE_MIN and seconds[tier] > 0:
                self.placement.measured(report.device, tier, nbytes / seconds[tier])
                old = self.s.ctx.bandwidth[tier]
                self.s.ctx.bandwidth[tier] = (1 - EWMA) * old + EWMA * nbytes / seconds[tier]

    def check_device(self, device: str | None) -> None:
        if device is not None and device not in self.s.pools:
            raise InvalidRequest(f"device {device!r} is not one of this server's: "
                                 f"{', '.join(self.s.pools)}", "device")

    def resident_sizes(self) -> set[int]:
        """(any thread) Byte sizes of the weight units held by any pool or the host tier,
        or known to loads still queued: a unit of another size cannot share bytes with them."""
        sizes = {u.nbytes for pool in self.s.pools.values() for u in pool.snapshot()
                 if u.kind in (UnitKind.WEIGHT, UnitKind.EXPERT)}
        sizes |= {nbytes for key, nbytes in self._queued_units() if key is not None}
        return sizes | (self.s.host.sizes() if self.s.host is not None else set())

    def _queued_units(self) -> list[tuple[str | None, int]]:
        return [unit for needs in list(self.queued.values()) for units in needs.values()
                for unit in units]

    def needs(self, model_id: str, weights: Path, spec: ModelSpec, task: TaskSource | None,
              host_only: frozenset[str], sizes: set[int]) -> Needs:
        """(any thread) The units the model needs, per device. Files never seen are hashed
        here only if the model may share units with those held (`worth_a_pass`: placement
        must know); else their keys stay None, computed as a load reads."""
        by_dtype: dict[torch.dtype, list[tuple[str | None, int]]] = {}
        out: Needs = {}
        plan = weight_plan(spec)
        for device, pool in self.s.pools.items():
            ctx = self.s.context(pool)
            if ctx.dtype not in by_dtype:
                sources = Sources.scan(weights, spec, ctx, model_id, compute=False)
                nbytes = {n: unit_nbytes(u, sources.schemes.get(n), ctx.dtype)
                          for n, u in plan.items()}            # quantized units: smaller
                keys = sources.keys
                if not keys and self.s.policy.share and worth_a_pass(
                        weights, spec, ctx, model_id, sources,
                        {n: b for n, b in nbytes.items() if n not in host_only}, sizes,
                        self.held):
                    keys = Sources.scan(weights, spec, ctx, model_id).keys
                units: list[tuple[str | None, int]] = [
                    (keys.get(name), nbytes[name]) for name in plan if name not in host_only]
                if task is not None:     # a task counts its base plus its blocks
                    units += [(key, t.nbytes // t.dtype.itemsize * ctx.dtype.itemsize)
                              for key, t in task.blocks.items()]
                by_dtype[ctx.dtype] = units
            out[device] = by_dtype[ctx.dtype]
        return out

    async def queue(self, model_id: str, weights: Path, spec: ModelSpec,
                    task: TaskSource | None, host_only: frozenset[str]
                    ) -> Callable[[], float]:
        """Before a load waits its turn: what it needs, announced; returns its cost
        estimate for grouping. A file never seen that may share with resident units is
        hashed here, while the load waits, not in its turn (where it would hold up the
        loads queued behind it)."""
        needs = await asyncio.to_thread(self.needs, model_id, weights, spec, task, host_only,
                                        set())
        if self.s.policy.share and any(key is None for units in needs.values()
                                       for key, _ in units):
            sizes = self.resident_sizes()                  # never hashed: may it share?
            if sizes:
                needs = await asyncio.to_thread(self.needs, model_id, weights, spec, task,
                                                host_only, sizes)
        self.announce(model_id, needs)
        return functools.partial(self.estimate, model_id)

    def announce(self, model_id: str, needs: Needs) -> None:
        """A load is queued: its known units count its model's waiting requests as their
        reuse (eviction spares them) and its turn can be ranked by its cost."""
        self.queued[model_id] = needs
        for units in needs.values():
            for key, _ in units:
                if key is not None:
                    self.s.ctx.users.setdefault(key, set()).add(model_id)

    def arriving(self, model_id: str, device: str, needs: Needs) -> None:
        """A load holds its turn on device: the units it brings count as resident there
        when other loads are placed, so that a fine-tune asked for while its base loads
        goes where the base is going."""
        keys = frozenset(key for key, _ in needs[device] if key is not None)
        pool = self.s.pools[device]
        lacking = [(k, n) for k, n in needs[device] if k is None or not _held(pool, k)]
        self.bringing[model_id] = (device, keys, lacking)

    def held(self, key: str) -> bool:
        """(any thread) Whether a unit of this key is in a pool, in the host tier, or
        coming with a load in its turn or queued for one."""
        return any(_held(pool, key) for pool in self.s.pools.values()) \
            or (self.s.host is not None and key in self.s.host) \
            or any(key in keys for _, keys, _ in list(self.bringing.values())) \
            or any(key == k for k, _ in self._queued_units())

    def arrived(self, model_id: str) -> None:
        self.bringing.pop(model_id, None)

    def beside(self, model_id: str, device: str, holding: list[str]) -> bool:
        """(event loop) Whether a queued load may copy into device beside the loads holding
        turns there (`holding`), and if so, its units are announced as theirs are. Only when
        it lacks at most BESIDE_SHARE of its bytes and nothing it pins can be half-filled:
        every key is known; none of those loads is filling the units it finds, nor needs
        the unpinned ones (it could evict one and read it again meanwhile); those it lacks
        are needed by none of those loads; and they fit in the free memory less what those
        loads have yet to allocate. It then evicts nothing and takes no one's memory."""
        units = self.queued.get(model_id, {}).get(device)
        if units is None or any(key is None for key, _ in units) or \
                any(m not in self.bringing for m in holding):
            return False
        pool = self.s.pools[device]
        others = [v for m, v in list(self.bringing.items()) if v[0] == device and m != model_id]
        needed = {k for _, keys, _ in others for k in keys}
        filling = {k for _, _, lack in others for k, _ in lack}
        lacking: list[tuple[str | None, int]] = []
        for key, nbytes in units:
            unit = pool.lookup(key) if key is not None else None
            if unit is None and key in needed:
                return False
            if unit is not None and (key in filling or (unit.pins == 0 and key in needed)):
                return False        # half-filled, or may be evicted and read again by them
            if unit is None:
                lacking.append((key, nbytes))
        if sum(n for _, n in lacking) > BESIDE_SHARE * sum(n for _, n in units):
            return False        # mostly bytes to move: it would only split the bandwidth
        pending = [n for _, _, lack in others for k, n in lack if k is None or not _held(pool, k)]
        blocks = sum(pool.blocks_for(n) for _, n in lacking) + \
            sum(pool.blocks_for(n) for n in pending)
        if blocks > pool.free_bytes // pool.block_size:
            return False
        keys = frozenset(key for key, _ in units if key is not None)
        self.bringing[model_id] = (device, keys, lacking)
        return True

    @property
    def incoming(self) -> dict[str, tuple[str, frozenset[str]]]:
        """Loads in their turn: model -> (device, the content keys they bring there)."""
        return {m: (d, keys) for m, (d, keys, _) in list(self.bringing.items())}

    def _coming(self, device: str, model_id: str) -> set[str]:
        return {k for m, (d, keys, _) in list(self.bringing.items())
                if d == device and m != model_id for k in keys}

    def estimate(self, model_id: str, on: str | None = None) -> float:
        """(any thread) Seconds a queued load would move bytes for, on device `on` (None:
        its cheapest device): units resident there cost nothing, those in the host tier
        come at its bandwidth."""
        needs = self.queued.get(model_id)
        if needs is None:
            return math.inf
        best = math.inf
        for device, units in needs.items():
            if on is not None and device != on:
                continue
            pool = self.s.pools[device]
            missing, _ = missing_units(units, functools.partial(_held, pool), self.s.host)
            bw = self.placement.bandwidth.get(device, self.s.ctx.bandwidth)
            best = min(best, sum(m.nbytes / bw[m.tier] for m in missing))
        return best

    async def choose(self, model_id: str, needs: Needs, device: str | None
                     ) -> tuple[Score, list[Score]]:
        """The device to load on (device, when given, overrides the scores) and every
        device's score; nothing is recorded (a load may place again when its turn comes)."""
        scores = await self.s.engine.run(self.scores, model_id, needs)
        by_device = {s.device: s for s in scores}
        return (by_device[device] if device is not None else self._choose(scores)), scores

    def commit(self, model_id: str, chosen: Score, scores: list[Score], requested: bool
               ) -> tuple[BlockPool, dict[str, object]]:
        """The load goes ahead on chosen: the pool, and the report's placement entry; logs
        the choice and its terms in one line."""
        if chosen.missing_bytes > chosen.free_bytes:
            self.placement.swapped(chosen.device)
        log.info("placing %s on %s%s: %s", model_id, chosen.device,
                 " (requested)" if requested else "",
                 "; ".join(f"{s.device} move {s.move_s:.3f}s evict {s.evict_s:.3f}s queue "
                           f"{s.queue_s:.3f}s free {s.free_bytes / 1e6:.0f}MB"
                           f"{'' if s.fits else ' (no room)'}" for s in scores))
        return self.s.pools[chosen.device], report(chosen, scores, requested)

    def _choose(self, scores: list[Score]) -> Score:
        if self.rule == "most-free":          # the baseline: most free memory first
            return max(scores, key=lambda s: s.free_bytes)
        if self.rule == "round-robin":
            return scores[next(self._turn) % len(scores)]
        return Placement.choose(scores)

    def scores(self, model_id: str, needs: Needs) -> list[Score]:
        """(step thread) Every device's score for loading model_id. CPU pools share the
        CPU's compute: each sees the work queued on all of them. Units that loads placed
        on a device bring there count as resident there."""
        own = self.s.engine.queued_steps()
        on_cpu = sum(n for d, n in own.items() if d.startswith("cpu"))
        queued = own | {d: on_cpu for d in self.s.pools if d.startswith("cpu")}
        out = []
        for device, pool in self.s.pools.items():
            arenas = [a for a in self.s.tasks.arenas.values() if a.pool is pool]
            coming = self._coming(device, model_id)

            def resident(key: str, pool: BlockPool = pool, arenas: list[TileArena] = arenas,
                         coming: set[str] = coming) -> bool:
                return pool.lookup(key) is not None or any(key in a for a in arenas) \
                    or key in coming

            missing, keep = missing_units(needs[device], resident, self.s.host)
            victims = pool.policy([u for u in pool.units.values() if u.pins == 0])
            idle = [units for _, units in self.idle_units(pool, model_id)]
            out.append(self.placement.score(pool, missing, keep, victims, idle,
                                            queued.get(device, 0), own.get(device, 0)))
        return out

    def idle_units(self, pool: BlockPool, loading: str) -> list[tuple[str, list[Unit]]]:
        """Per idle model on pool, in the policy's unload order: the units it alone holds."""
        s = self.s
        on_pool = {m: model for m, model in s.models.items()
                   if model.pool is pool and m != loading}
        idle = [m for m, model in on_pool.items() if not s.engine.has_sequences(model)
                and not (m in s.residency and s.residency[m].pinned)]
        kept = {u.id for m, model in on_pool.items() if m not in idle
                for u in model.distinct_units}
        return [(m, [u for u in on_pool[m].distinct_units if u.id not in kept])
                for m in s.policy.model_order(idle, s.ctx)]

    def resident_elsewhere(self, model_id: str, device: str | None) -> None:
        """A model lives on one device: asking for another while resident is an error."""
        model = self.s.models.get(model_id)
        if device is not None and model is not None and model.pool.device != device:
            raise InvalidRequest(f"model '{model_id}' is resident on {model.pool.device}; "
                                 f"unload it before loading it on {device}", "device")


def _held(pool: BlockPool, key: str) -> bool:
    return pool.lookup(key) is not None
