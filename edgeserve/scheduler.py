"""Which models are resident, on which device, and for how long.

The scheduler decides; the engine's step thread executes (loads and releases run there,
between steps). Loads of one model are single-flight: concurrent callers share one.
A model stays resident until unloaded, until its keep-alive runs out with no request
running, or (later) until pool pressure evicts it; a pinned model never leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.loading import TaskLoader
from edgeserve.checkpoint import HashCache
from edgeserve.config import ExpertConfig, TierConfig
from edgeserve.engine import Engine
from edgeserve.events import publish
from edgeserve.eviction import Demand, PolicyContext, create_policy
from edgeserve.experts.offload import ExpertOffload, host_only_units
from edgeserve.kv.offload import KVHostTier
from edgeserve.loader import (
    LoadContext,
    LoadReport,
    Prepared,
    Sources,
    abort,
    fill,
    prepare,
    read_spec,
)
from edgeserve.metrics import Metrics
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool, PoolFull, Unit, UnitKind
from edgeserve.store import ModelStore
from edgeserve.tiers import DiskLoader, HostTier
from edgeserve.tokenizer import Tokenizer
from edgeserve.tokenizer_cache import TokenizerCache

log = logging.getLogger("edgeserve.scheduler")
WEIGHT_KINDS = (UnitKind.WEIGHT, UnitKind.EXPERT)   # immutable units worth keeping
BUSY_WAIT = 120.0     # seconds a load waits for busy models to make room
MEASURE_MIN = 8 << 20  # bytes a load must move from a tier to measure its bandwidth
DEMOTE_GAIN = 1.5      # demote to the host tier only if it is this much faster than disk


@dataclass(slots=True)
class Residency:
    """How long a model stays: None = until unloaded or evicted."""

    pinned: bool = False
    keep_alive: float | None = None
    timer: asyncio.TimerHandle | None = None


class Scheduler:
    def __init__(self, store: ModelStore, pools: dict[str, BlockPool], engine: Engine,
                 metrics: Metrics, dtype_for: Callable[[str], torch.dtype],
                 tiers: TierConfig | None = None, host: HostTier | None = None,
                 experts: ExpertConfig | None = None) -> None:
        self.store, self.pools, self.engine, self.metrics = store, pools, engine, metrics
        self.dtype_for = dtype_for
        tiers = tiers or TierConfig()
        self.experts = experts or ExpertConfig()
        self.policy = create_policy(tiers.policy)
        self.host = host if self.policy.host_tier else None
        self.ctx = PolicyContext(Demand(), host=self.host)
        self.hashes = HashCache(store.root)
        self.disk = DiskLoader(tiers.readers, tiers.read_chunk,
                               pinned=any(p.device.startswith("cuda") for p in pools.values()))
        self.kv_host = KVHostTier(self.host, self.ctx.bandwidth)
        for pool in pools.values():
            pool.policy = lambda units: self.policy.unit_order(units, self.ctx)
            pool.before_evict.append(self._demote)
            pool.before_evict.append(functools.partial(self.kv_host.demote, pool))
            pool.on_evict.append(self._forget_chunk)
        self.models: dict[str, ResidentModel] = {}
        self.tasks = TaskLoader(engine, self.disk)
        self.tokenizer_cache = TokenizerCache()
        self.tokenizers: dict[str, Tokenizer | None] = {}
        self.residency: dict[str, Residency] = {}
        self._loading: dict[str, asyncio.Task[LoadReport]] = {}
        self._load_lock = asyncio.Lock()    # one load copies at a time: nothing moves meanwhile
        self.totals = dict.fromkeys(("loads", "seconds", "bytes_from_device",
                                     "bytes_from_host", "bytes_from_disk"), 0.0)

    # ---- loading -----------------------------------------------------------------------
    async def load(self, model_id: str) -> LoadReport:
        """Make model_id resident; concurrent calls for one model share one load."""
        if model_id in self.models:
            model = self.models[model_id]
            return LoadReport(model_id, model.pool.device, 0.0, model.weight_bytes,
                              bytes_from_device=model.weight_bytes)
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda _: self._loading.pop(model_id, None))
        return await asyncio.shield(task)

    def choose_pool(self) -> BlockPool:
        return max(self.pools.values(), key=lambda p: p.free_bytes)

    def context(self, pool: BlockPool) -> LoadContext:
        return LoadContext(pool, self.dtype_for(pool.device), self.hashes, self.host, self.disk,
                           share=self.policy.share)

    async def _load(self, model_id: str) -> LoadReport:
        path = self.store.path(model_id)
        start = time.perf_counter()
        pack = await asyncio.to_thread(self.tasks.pack, model_id, path, self.store)
        weights = self.store.path(pack.base) if pack is not None else path
        spec = await asyncio.to_thread(read_spec, weights)
        task = await asyncio.to_thread(self.tasks.source, path, spec, weights, self.hashes) \
            if pack else None
        tokenizer = None
        for folder in (path, weights):
            if (folder / "tokenizer.json").is_file():
                tokenizer = await asyncio.to_thread(self.tokenizer_cache.load, folder)
                break
        async with self._load_lock:
            pool = self.choose_pool()
            ctx = self.context(pool)
            report = LoadReport(model_id, pool.device)
            host_only = host_only_units(spec, self.experts.budget)
            prepared = await self._prepare(model_id, weights, spec, ctx, report, host_only)
            pool.freeze()
            try:
                with _progress(model_id, report.bytes_from_disk + report.bytes_from_host) as bar:
                    seconds = await asyncio.to_thread(fill, prepared, ctx, bar)
                self._measure(report, seconds)
            except BaseException:
                await self.engine.run(abort, prepared, pool)
                raise
            finally:
                pool.thaw()
            model = ResidentModel.from_units(model_id, weights, spec, pool, ctx.dtype,
                                             prepared.units)
            model.kv.host = self.kv_host
            if task is not None:
                model.base = task.pack.base
                deadline = time.monotonic() + BUSY_WAIT
                try:
                    model.task = await self.tasks.load(
                        model_id, task, spec, ctx, report, model.units,
                        lambda e: self._make_room(pool, model_id, deadline, e))
                except BaseException:
                    await self.engine.run(model.release, self.policy.retain)
                    raise
            if spec.family == "moe" and self.experts.budget < 1.0:
                e = self.experts
                try:
                    model.offload = await self.engine.run(ExpertOffload, model, e.budget,
                                                          e.policy, e.threshold, e.prefetch,
                                                          prepared.host)
                    await asyncio.to_thread(model.offload.pin_host)
                except BaseException:
                    await self.engine.run(model.release, self.policy.retain)
                    raise
            for unit in model.distinct_units + (model.task.units if model.task else []):
                self.ctx.users.setdefault(unit.key or "", set()).add(model_id)
        report.seconds = time.perf_counter() - start
        if not model.eos_token_ids and tokenizer is not None:
            model.eos_token_ids = tokenizer.eos_token_ids
        self.tokenizers[model_id] = tokenizer
        self.models[model_id] = model
        self.residency.setdefault(model_id, Residency())
        self._record(report)
        publish(pool, "load", **asdict(report))     # model, seconds, bytes by tier
        log.info("loaded %s on %s: %.1f MB in %.2f s", model_id, pool.device,
                 report.bytes_total / 1e6, report.seconds)
        return report

    async def _prepare(self, model_id: str, path: Path, spec: ModelSpec, ctx: LoadContext,
                       report: LoadReport, host_only: frozenset[str] = frozenset()
                       ) -> Prepared:
        """Pin and allocate the model's units, unloading idle models while memory is short
        (and waiting for busy ones to go idle, up to BUSY_WAIT seconds)."""
        deadline = time.monotonic() + BUSY_WAIT
        sources = await asyncio.to_thread(Sources.scan, path, spec, ctx, model_id)
        while True:
            attempt = replace(report)
            try:
                prepared = await self.engine.run(prepare, path, spec, ctx, model_id, attempt,
                                                 sources, host_only)
            except PoolFull as e:
                await self._make_room(ctx.pool, model_id, deadline, e)
                continue
            for name in ("bytes_total", "bytes_from_device", "bytes_from_host",
                         "bytes_from_disk"):
                setattr(report, name, getattr(attempt, name))
            return prepared

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

    def _measure(self, report: LoadReport, seconds: dict[str, float]) -> None:
        """Learn each tier's bandwidth from real loads (moving average)."""
        for tier, nbytes in (("host", report.bytes_from_host), ("disk", report.bytes_from_disk)):
            if nbytes >= MEASURE_MIN and seconds[tier] > 0:
                old = self.ctx.bandwidth[tier]
                self.ctx.bandwidth[tier] = 0.7 * old + 0.3 * nbytes / seconds[tier]

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

    def request_started(self, model_id: str) -> None:
        self.ctx.demand.record(model_id)

    def _record(self, report: LoadReport) -> None:
        self.totals["loads"] += 1
        for name in ("seconds", "bytes_from_device", "bytes_from_host", "bytes_from_disk"):
            self.totals[name] += getattr(report, name)
        self.metrics.loads.labels(report.model, report.device).inc()
        tiers = {"device": report.bytes_from_device, "host": report.bytes_from_host,
                 "disk": report.bytes_from_disk}
        tier = max(tiers, key=tiers.__getitem__)
        self.metrics.load_seconds.labels(report.model, tier).observe(report.seconds)

    async def unload(self, model_id: str) -> None:
        """Stop serving model_id once its running requests end; its memory goes back."""
        model = self.models.pop(model_id, None)
        state = self.residency.pop(model_id, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()
        if model is None:
            self.store.path(model_id)           # UnknownModel for an id not in the store
            return
        while self.engine.has_sequences(model):
            await asyncio.sleep(0.01)
        await self.engine.run(model.release, self.policy.retain)
        publish(model.pool, "unload", model_id, retained=self.policy.retain)
        log.info("unloaded %s", model_id)

    def release_all(self) -> None:
        """Free every model; only once the engine has stopped."""
        for task in self._loading.values():
            task.cancel()
        for state in self.residency.values():
            if state.timer is not None:
                state.timer.cancel()
        for model in self.models.values():
            model.release(retain=False)
        self.models.clear()
        self.kv_host.clear(self.pools.values())

    # ---- residency ---------------------------------------------------------------------
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


@contextlib.contextmanager
def _progress(model_id: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr, shown only if the load takes over a second."""
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {model_id}", delay=1.0,
              leave=False) as bar:
        yield bar.update
