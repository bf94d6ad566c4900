"""A Hugging Face model folder becomes content-addressed weight units in a pool.

A load has two phases. `prepare` (on the engine's step thread, where the pool may
change) pins every unit already resident with the same content key and allocates the
rest. `fill` (on a loader thread, while other models keep running) copies each new unit
from the fastest tier that holds it: the host tier, else disk through the pipeline of
tiers.DiskLoader. The checkpoint is never held whole in Python memory.

A unit's key is a hash of the compute dtype, its shape and the content hashes of the
checkpoint tensors it is made of (cached per file in the store), so a fine-tune shares
every unit whose bytes equal its base's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeserve.arch import WeightUnit, weight_plan
from edgeserve.arch.spec import ModelSpec
from edgeserve.checkpoint import HashCache
from edgeserve.loader.sources import Sources, read_spec, scan_checkpoint, unit_keys
from edgeserve.pool import BlockPool, PoolFull, Unit
from edgeserve.quant.layout import QuantLayout
from edgeserve.quant.linear import QWeight
from edgeserve.quant.units import disk_jobs, unit_nbytes
from edgeserve.tiers import DiskJob, DiskLoader, HostSlab, HostTier, ReadOptions

__all__ = ["DTYPES", "HostUnits", "LoadContext", "LoadReport", "Prepared", "Sources", "abort",
           "fill", "parse_dtype", "prepare", "read_spec", "scan_checkpoint", "unit_keys",
           "weight_views"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


@dataclass(slots=True)
class LoadReport:
    """Where a load's bytes came from, and how long it took."""

    model: str
    device: str
    seconds: float = 0.0
    bytes_total: int = 0
    bytes_from_device: int = 0
    bytes_from_host: int = 0
    bytes_from_disk: int = 0
    # a first sight (files never hashed) reads every unit, then releases those whose bytes
    # were resident already: counted in bytes_from_device, and here as the extra read
    bytes_released: int = 0
    placement: dict[str, Any] | None = None     # the device chosen, and every device's score
    scheme: str | None = None         # int8 / int4 / mixed: quantized weights
    quantize_seconds: float = 0.0     # spent quantizing the checkpoint (first load only)
    turn_seconds: float = 0.0         # spent waiting for other loads (one load at a time)
    room_seconds: float = 0.0         # spent waiting for busy models to make room
    beside: bool = False              # copied beside the load holding its device's turn
    source: str = ""                  # the folder the weights were read from
    converted: str = ""               # a GGUF file's tensor types and what they became


@dataclass
class LoadContext:
    """What a load needs besides the model: where units go and where they may come from."""

    pool: BlockPool
    dtype: torch.dtype
    hashes: HashCache
    host: HostTier | None = None
    disk: DiskLoader = field(default_factory=DiskLoader)
    share: bool = True               # False: keys include the model id (no sharing)


@dataclass
class Prepared:
    units: dict[str, Unit]                                  # unit name -> pinned unit
    fresh: list[Unit] = field(default_factory=list)         # allocated by this load
    host: HostUnits | None = None     # units read into host memory instead of the pool
    from_host: list[tuple[torch.Tensor, Unit]] = field(default_factory=list)
    from_disk: list[DiskJob] = field(default_factory=list)
    schemes: dict[str, str] = field(default_factory=dict)   # quantized unit -> scheme


def prepare(model_dir: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
            report: LoadReport, sources: Sources | None = None,
            host_only: frozenset[str] = frozenset()) -> Prepared:
    """Pin the resident units, allocate the missing ones (engine thread). Raises PoolFull
    before allocating anything when the missing units cannot fit even after eviction.
    The units named in host_only are read into host memory instead (a MoE model's experts
    beyond its budget). Without keys (files never hashed), every unit is allocated without
    a key, to be keyed once read (first_sight.py). While it evicts, the host tier keeps
    the copies of its own units (the units evicted are demoted there meanwhile)."""
    sources = sources or Sources.scan(model_dir, spec, ctx, owner)
    with ctx.host.protect(sources.keys.values()) if ctx.host is not None else nullcontext():
        return _allocate(ctx, owner, report, sources, weight_plan(spec), host_only)


def _allocate(ctx: LoadContext, owner: str, report: LoadReport, sources: Sources,
              whole: dict[str, WeightUnit], host_only: frozenset[str]) -> Prepared:
    tensors, keys = sources.tensors, sources.keys
    pool = ctx.pool
    plan = {n: u for n, u in whole.items() if n not in host_only}
    schemes = sources.schemes
    out = Prepared({}, schemes=schemes)
    reads: list[tuple[str, Unit]] = []       # units to read from disk, in plan order
    try:
        counted: set[int] = set()
        for name in plan:                     # pin first: this load never evicts its own
            unit = pool.lookup(keys[name]) if name in keys else None
            if unit is not None:
                pool.pin(unit)
                out.units[name] = unit
                if unit.id not in counted:        # equal bytes twice in one model: once
                    counted.add(unit.id)
                    report.bytes_from_device += unit.nbytes
        _check_room(plan, out.units, keys, ctx, schemes)
        for name, planned in plan.items():
            if name in out.units:
                continue
            key = keys.get(name)                  # equal bytes twice in one model: one unit
            same = pool.lookup(key) if key is not None else None
            if same is not None:
                pool.pin(same)
                out.units[name] = same
                continue
            nbytes = unit_nbytes(planned, schemes.get(name), ctx.dtype)
            unit = pool.allocate(planned.kind, nbytes, key=key, owner=owner)
            out.units[name] = unit
            out.fresh.append(unit)
            cached = ctx.host.get(key) if ctx.host is not None and key is not None else None
            if cached is not None:
                out.from_host.append((cached, unit))
                report.bytes_from_host += nbytes
                continue
            report.bytes_from_disk += nbytes
            reads.append((name, unit))
        # Views only once every unit is allocated: a later allocation may compact the
        # pool and move the units allocated before it.
        for name, unit in reads:
            planned = plan[name]
            if name in schemes:
                out.from_disk += disk_jobs(planned, schemes[name], tensors, pool.raw(unit))
                continue
            view = pool.view(unit, ctx.dtype, planned.shape)
            for part, first, rows in planned.slices():
                out.from_disk.append(DiskJob(tensors[part], view[first:first + rows]))
        if host_only:
            out.host = _host_units(whole, host_only, sources, ctx, out.from_disk)
            report.bytes_from_disk += out.host.nbytes
    except BaseException:
        abort(out, pool)
        raise
    report.bytes_total = sum(u.nbytes for u in {id(u): u for u in out.units.values()}.values()) \
        + (out.host.nbytes if out.host is not None else 0)       # read into host memory
    return out


@dataclass
class HostUnits:
    """Units a load read into host memory rather than the pool (a MoE model's experts beyond
    its budget), in one slab: name -> (content key, values)."""

    slab: HostSlab
    tensors: dict[str, tuple[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors.values())


def _host_units(plan: dict[str, WeightUnit], names: frozenset[str], sources: Sources,
                ctx: LoadContext, jobs: list[DiskJob]) -> HostUnits:
    """Host tensors for the named units, adding the disk jobs that fill them to jobs: a
    float unit as a tensor of its shape, a quantized one as its raw bytes (uint8), as the
    pool would hold them."""
    ordered = sorted(names)
    schemes = sources.schemes
    slab = HostSlab([unit_nbytes(plan[n], schemes.get(n), ctx.dtype) for n in ordered])
    out = {}
    for name in ordered:
        planned, scheme = plan[name], schemes.get(name)
        if scheme:
            data = slab.take((unit_nbytes(planned, scheme, ctx.dtype),), torch.uint8)
            jobs += disk_jobs(planned, scheme, sources.tensors, data)
        else:
            data = slab.take(planned.shape, ctx.dtype)
            for part, first, rows in planned.slices():
                jobs.append(DiskJob(sources.tensors[part], data[first:first + rows]))
        out[name] = (sources.keys[name], data)
    return HostUnits(slab, out)


def _check_room(plan: dict[str, WeightUnit], have: dict[str, Unit], keys: dict[str, str],
                ctx: LoadContext, schemes: dict[str, str]) -> None:
    missing = {keys.get(n, f"?{n}"): unit_nbytes(u, schemes.get(n), ctx.dtype)
               for n, u in plan.items() if n not in have}
    blocks = sum(ctx.pool.blocks_for(b) for b in missing.values())
    spare = ctx.pool.spare_blocks()
    if blocks > spare:
        raise PoolFull(ctx.pool.device, blocks * ctx.pool.block_size,
                       spare * ctx.pool.block_size)
    # One eviction pass for the whole load, not one per unit allocated.
    ctx.pool.evict(blocks * ctx.pool.block_size)


def fill(prepared: Prepared, ctx: LoadContext,
         progress: Callable[[int], None] | None = None,
         options: ReadOptions | None = None) -> dict[str, float]:
    """Copy the new units' bytes in (any thread; the pool must not compact meanwhile).
    Returns the seconds spent on each source tier."""
    start = time.perf_counter()
    for data, unit in prepared.from_host:
        if options is not None:
            options.check()
        ctx.pool.raw(unit).copy_(data)
        if progress is not None:
            progress(unit.nbytes)
    middle = time.perf_counter()
    ctx.disk.load(prepared.from_disk, progress, options=options)
    return {"host": middle - start, "disk": time.perf_counter() - middle}


def abort(prepared: Prepared, pool: BlockPool) -> None:
    """Undo a prepare: free what it allocated, unpin what it reused."""
    fresh = {id(u) for u in prepared.fresh}
    for unit in prepared.units.values():
        if id(unit) in fresh:
            pool.release(unit)
        elif unit.alive:
            pool.unpin(unit)
    prepared.units.clear()


def weight_views(pool: BlockPool, units: dict[str, Unit], spec: ModelSpec,
                 dtype: torch.dtype, schemes: dict[str, str] | None = None
                 ) -> dict[str, torch.Tensor | QWeight]:
    """Views of a model's units: tensors, or QWeights for its quantized units."""
    plan, schemes = weight_plan(spec), schemes or {}
    out: dict[str, torch.Tensor | QWeight] = {}
    for name, unit in units.items():
        scheme = schemes.get(name)
        if scheme:
            views = QuantLayout(scheme, plan[name].shape).views(pool.raw(unit))
            out[name] = QWeight.of(scheme, views)
        else:
            out[name] = pool.view(unit, dtype, plan[name].shape)
    return out
