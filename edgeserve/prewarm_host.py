"""Prewarming into the host tier: a model's units read from disk into host memory.

Used when no device has room for a predicted model without evicting something worth
more: its next load then copies from host memory instead of reading the disk. Only
when the host tier has room for all of it without dropping any entry.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeserve.arch import weight_plan
from edgeserve.loader import Sources, read_spec
from edgeserve.tiers import DiskJob, ReadOptions

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler


def read_to_host(s: Scheduler, model_id: str, path: Path, device: str,
                 stop: threading.Event) -> int:
    """(any thread) Read the units of model_id that neither a pool nor the host tier holds
    into the host tier, in device's compute dtype; returns the bytes read (0: no room)."""
    host = s.host
    if host is None:
        return 0
    ctx = s.context(s.pools[device])
    spec = read_spec(path)
    sources = Sources.scan(path, spec, ctx, model_id)       # idle time: hashing is fine
    wanted: dict[str, tuple[tuple[int, ...], list[tuple[str, int, int]]]] = {}
    for name, unit in weight_plan(spec).items():
        key = sources.keys[name]
        if key in wanted or key in host or any(p.lookup(key) for p in s.pools.values()):
            continue
        wanted[key] = (tuple(unit.shape), list(unit.slices()))
    nbytes = sum(math.prod(shape) * ctx.dtype.itemsize for shape, _ in wanted.values())
    if nbytes == 0 or host.capacity - host.used < nbytes:
        return 0
    jobs: list[DiskJob] = []
    tensors: dict[str, torch.Tensor] = {}
    for key, (shape, slices) in wanted.items():
        data = tensors[key] = torch.empty(shape, dtype=ctx.dtype)
        for part, first, rows in slices:
            jobs.append(DiskJob(sources.tensors[part], data[first:first + rows]))
    s.disk.load(jobs, options=ReadOptions(stop=stop))
    for key, data in tensors.items():
        host.put(key, data)
    return nbytes
