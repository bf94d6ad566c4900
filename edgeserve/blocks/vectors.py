"""A task's vectors: the norm weights and biases it changed, one pool unit per task.

The unit holds, for each pool unit the task changes (a norm, or a fused bias such as
q/k/v's), that unit's whole new value: the base's, with the task's tensors written over
their rows. It is keyed by the base units and the task's vectors, so reloading a task (or
another with the same vectors) finds it resident.

    unit bytes | input_layernorm (D) | qkv_proj.bias (Q + 2 KV) | ... |
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.targets import vector_targets
from edgeserve.checkpoint import TensorInfo
from edgeserve.loader import LoadReport
from edgeserve.pool import BlockPool, Unit, UnitKind
from edgeserve.tiers import DiskJob


@dataclass(eq=False)
class TaskVectors:
    pool: BlockPool
    unit: Unit
    dtype: torch.dtype
    layout: dict[str, tuple[int, int]]          # pool unit name -> (first element, length)
    fresh: bool = False                         # allocated by this load, not yet filled
    _views: dict[str, torch.Tensor] = field(default_factory=dict)
    _epoch: int = -1

    def view(self, name: str) -> torch.Tensor | None:
        """The task's whole value of pool unit `name`, if it changed it."""
        if self._epoch != self.pool.epoch:
            total = sum(n for _, n in self.layout.values())
            flat = self.pool.view(self.unit, self.dtype, (total,))
            self._views = {u: flat[a:a + n] for u, (a, n) in self.layout.items()}
            self._epoch = self.pool.epoch
        return self._views.get(name)

    def release(self) -> None:
        if self.unit.alive:
            self.pool.unpin(self.unit)

    def abort(self) -> None:
        """The load failed: a unit it allocated holds no valid bytes, so it goes at once."""
        if self.fresh:
            self.pool.release(self.unit)
        else:
            self.release()


def prepare_vectors(vectors: dict[str, str], blocks: dict[str, TensorInfo], spec: ModelSpec,
                    pool: BlockPool, dtype: torch.dtype, units: dict[str, Unit], owner: str,
                    report: LoadReport) -> tuple[TaskVectors | None, list[DiskJob]]:
    """Pin or make the task's vector unit (engine thread): the base's values are copied in
    now, the task's tensors come with the returned disk jobs."""
    if not vectors:
        return None, []
    targets, plan = vector_targets(spec), weight_plan(spec)
    parts: dict[str, list[str]] = {}
    for name in sorted(vectors):
        parts.setdefault(targets[name].unit, []).append(name)
    layout, offset = {}, 0
    for name in sorted(parts):
        layout[name] = (offset, plan[name].shape[0])
        offset += plan[name].shape[0]
    h = hashlib.blake2b(f"vectors|{dtype}|".encode(), digest_size=16)
    for name in sorted(parts):
        h.update(f"{name}:{units[name].key}:".encode())
        h.update(",".join(vectors[p] for p in parts[name]).encode())
    key, nbytes = h.hexdigest(), offset * dtype.itemsize
    found = pool.lookup(key)
    if found is not None:
        pool.pin(found)
        report.bytes_total += nbytes
        report.bytes_from_device += nbytes
        return TaskVectors(pool, found, dtype, layout), []
    unit = pool.allocate(UnitKind.TASK_BLOCK, nbytes, key=key, owner=owner)
    flat = pool.view(unit, dtype, (offset,))
    jobs = []
    for name, (first, length) in layout.items():
        flat[first:first + length].copy_(pool.view(units[name], dtype, (length,)))
        for part in parts[name]:
            row, rows = targets[part].row, targets[part].shape[0]
            jobs.append(DiskJob(blocks[vectors[part]],
                                flat[first + row:first + row + rows]))
    moved = sum(math.prod(j.dest.shape) for j in jobs) * dtype.itemsize
    report.bytes_total += nbytes
    report.bytes_from_disk += moved
    report.bytes_from_device += nbytes - moved
    return TaskVectors(pool, unit, dtype, layout, fresh=True), jobs
