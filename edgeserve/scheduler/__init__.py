"""Which models are resident, on which device, and for how long.

The scheduler decides; the engine's step thread executes (loads and releases run there,
between steps). Loads of one model are single-flight: concurrent callers share one, and
loads onto one device take turns (grouping.py), loads onto different devices go side by
side. A load goes to the device placement scores best (placer.py), chosen before it waits
its turn and checked again when the turn comes (turns.py); files never seen are hashed
as they are read (first_sight.py), or before, in idle time (store_hashing.py); idle time
prewarms models predicted to be asked for (prewarm.py). How long a model stays is
residency.py's: until unloaded, until its keep-alive runs out, or until pool pressure
unloads it; a pinned model never leaves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.loading import TaskLoader
from edgeserve.checkpoint import HashCache
from edgeserve.config import ExpertConfig, SchedulerConfig, TierConfig
from edgeserve.demand import DemandHistory
from edgeserve.engine import Engine
from edgeserve.events import publish
from edgeserve.eviction import PolicyContext, create_policy
from edgeserve.experts.budget import host_only_units
from edgeserve.experts.offload import ExpertOffload
from edgeserve.first_sight import FirstSight, settle
from edgeserve.gguf.convert import summary as gguf_summary
from edgeserve.grouping import Grouping
from edgeserve.kv.offload import KVHostTier
from edgeserve.loader import (
    HostUnits,
    LoadContext,
    LoadReport,
    abort,
    fill,
    read_spec,
)
from edgeserve.metrics import Metrics
from edgeserve.model import ResidentModel
from edgeserve.placer import Placer
from edgeserve.pool import BlockPool
from edgeserve.prewarm import Prewarmer
from edgeserve.quant.cache import QuantCache
from edgeserve.residency import Residencies, Residency
from edgeserve.scheduler.loading import load_scheme, progress
from edgeserve.scheduler.room import BUSY_WAIT, RoomMaking
from edgeserve.scheduler.turns import Load, placed_turn
from edgeserve.store import ModelStore, split_tag
from edgeserve.store_hashing import StoreHashing
from edgeserve.tiers import DiskLoader, HostTier, LoadCancelled, ReadOptions
from edgeserve.tokenizer import Tokenizer
from edgeserve.tokenizer_cache import TokenizerCache

log = logging.getLogger("edgeserve.scheduler")


class Scheduler(Residencies, RoomMaking):
    def __init__(self, store: ModelStore, pools: dict[str, BlockPool], engine: Engine,
                 metrics: Metrics, dtype_for: Callable[[str], torch.dtype],
                 tiers: TierConfig | None = None, host: HostTier | None = None,
                 experts: ExpertConfig | None = None,
                 config: SchedulerConfig | None = None, quantize: str | None = None
                 ) -> None:
        self.store, self.pools, self.engine, self.metrics = store, pools, engine, metrics
        self.dtype_for = dtype_for
        tiers = tiers or TierConfig()
        self.experts = experts or ExpertConfig()
        self.policy = create_policy(tiers.policy)
        self.host = host if self.policy.host_tier else None
        self.config = config or SchedulerConfig()
        self.ctx = PolicyContext(DemandHistory(), host=self.host)
        self.hashes = HashCache(store.root)
        self.quant, self.quantize = QuantCache(store.root, self.hashes), quantize
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
        self.totals = dict.fromkeys(("loads", "seconds", "bytes_from_device",
                                     "bytes_from_host", "bytes_from_disk"), 0.0)
        self.grouping = Grouping(self.config.group_wait)   # loads take turns per device
        self.ctx.waiting = self.grouping.waiting
        self.placer = Placer(self, self.config.step_seconds, self.config.placement)
        self.prewarm = Prewarmer(self, enabled=self.config.prewarm)
        self.prewarm.start()
        self.idle_hashing = StoreHashing(self, enabled=self.config.idle_hashing)
        self.idle_hashing.start()

    # ---- loading -----------------------------------------------------------------------
    async def load(self, model_id: str, device: str | None = None,
                   stop: threading.Event | None = None) -> LoadReport:
        """Make model_id resident, on `device` or where placement scores best; concurrent
        calls for one model share one load. `stop` set: the load gives up (a prewarm)."""
        self.placer.check_device(device)
        while True:
            self.idle_hashing.demand()
            if stop is None:
                self.prewarm.real_load(model_id)
            if model_id in self.models:
                self.placer.resident_elsewhere(model_id, device)
                model = self.models[model_id]
                return LoadReport(model_id, model.pool.device, 0.0, model.weight_bytes,
                                  bytes_from_device=model.weight_bytes)
            task = self._loading.get(model_id)
            if task is None:
                task = asyncio.create_task(self._load(model_id, device, stop))
                self._loading[model_id] = task
                task.add_done_callback(
                    lambda t: self._loading.pop(model_id) if self._loading.get(model_id) is t
                    else None)
            try:
                return await asyncio.shield(task)
            except LoadCancelled:
                if stop is not None:
                    raise
                # Joined a prewarm that yielded: load anew. The ended task may still be
                # listed (its done callback has not run when it ended before we awaited).
                if self._loading.get(model_id) is task:
                    del self._loading[model_id]

    def context(self, pool: BlockPool) -> LoadContext:
        return LoadContext(pool, self.dtype_for(pool.device), self.hashes, self.host, self.disk,
                           share=self.policy.share)

    async def _load(self, model_id: str, device: str | None, stop: threading.Event | None
                    ) -> LoadReport:
        path = await asyncio.to_thread(self.store.prepare, model_id)   # GGUF: converted
        start = time.perf_counter()
        pack = await asyncio.to_thread(self.tasks.pack, model_id, path, self.store)
        weights = self.store.path(pack.base) if pack is not None else path
        spec = await asyncio.to_thread(read_spec, weights)
        tag = split_tag(model_id)[1]
        scheme = tag or self.quantize
        checkpoint, quantizing = (await asyncio.to_thread(self.quant.folder, weights, scheme,
                                                          tag is not None)
                                  if scheme else (weights, 0.0))
        task = await asyncio.to_thread(self.tasks.source, path, spec, weights, self.hashes) \
            if pack else None
        tokenizer = None
        for folder in (path, weights):
            if (folder / "tokenizer.json").is_file():
                tokenizer = await asyncio.to_thread(self.tokenizer_cache.load, folder)
                break
        host_only = host_only_units(spec, self.experts.budget)
        await self.placer.queue(model_id, checkpoint, spec, task, host_only)
        load = Load(model_id, checkpoint, spec, task, host_only)
        async with placed_turn(self, load, device, stop is None) as turn:
            ReadOptions(stop=stop).check()
            pool = turn.pool
            ctx = self.context(pool)
            report = LoadReport(model_id, pool.device, quantize_seconds=quantizing,
                                source=str(checkpoint), converted=gguf_summary(path),
                                **turn.fields())
            model, host = await self._read(model_id, checkpoint, spec, ctx, report, host_only,
                                           stop)
            report.scheme = load_scheme(model.schemes)
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
            await self._offload(model, spec, host)
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

    async def _read(self, model_id: str, weights: Path, spec: ModelSpec, ctx: LoadContext,
                    report: LoadReport, host_only: frozenset[str],
                    stop: threading.Event | None) -> tuple[ResidentModel, HostUnits | None]:
        """Prepare the units and fill them; files never seen are hashed as they are read."""
        pool = ctx.pool
        prepared, sources = await self._prepare(model_id, weights, spec, ctx, report,
                                                host_only, stop)      # returns it frozen
        try:
            first = FirstSight.of(sources, ctx.hashes)
            with progress(model_id, report.bytes_from_disk + report.bytes_from_host) as bar:
                options = first.options(stop) if first else ReadOptions(stop=stop)
                seconds = await asyncio.to_thread(fill, prepared, ctx, bar, options)
            self.placer.learn(report, seconds)
            if first is not None:
                keys = await asyncio.to_thread(first.keys, weights, spec, ctx, model_id, sources)
                await self.engine.run(settle, prepared, keys, pool, report)
        except BaseException:
            await self.engine.run(abort, prepared, pool)
            raise
        finally:
            pool.thaw()
        return ResidentModel.from_units(model_id, weights, spec, pool, ctx.dtype,
                                        prepared.units, prepared.schemes), prepared.host

    async def _offload(self, model: ResidentModel, spec: ModelSpec,
                       host: HostUnits | None) -> None:
        if spec.family != "moe" or self.experts.budget >= 1.0:
            return
        e = self.experts
        try:
            model.offload = await self.engine.run(ExpertOffload, model, e.budget, e.policy,
                                                  e.threshold, e.prefetch, host)
            await asyncio.to_thread(model.offload.pin_host)
        except BaseException:
            await self.engine.run(model.release, self.policy.retain)
            raise

    async def ready(self, model_id: str,
                    load: Callable[[str], Awaitable[LoadReport]] | None = None
                    ) -> ResidentModel:
        """The model, resident, once a request for it may start: loaded (through `load`,
        default self.load) if need be, and held back while grouping lets a load that
        waited too long go first."""
        return await self.grouping.ready(self.models, model_id, load or self.load)

    def request_started(self, model_id: str) -> None:
        self.ctx.demand.record(model_id)
        self.idle_hashing.demand()
        self.prewarm.request_started(model_id)

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
        self.grouping.unloaded()
        publish(model.pool, "unload", model_id, retained=self.policy.retain)
        log.info("unloaded %s", model_id)

    def release_all(self) -> None:
        """Free every model; only once the engine has stopped."""
        self.prewarm.stop()
        self.idle_hashing.stop()
        for task in self._loading.values():
            task.cancel()
        for state in self.residency.values():
            if state.timer is not None:
                state.timer.cancel()
        for model in self.models.values():
            model.release(retain=False)
        self.models.clear()
        self.kv_host.clear(self.pools.values())

