"""Quantized units of a load: which units of a checkpoint are quantized, their size, where
their bytes come from on disk, and their content keys.

A unit (one checkpoint tensor, or several stacked along dim 0) is quantized when its
checkpoint stores its parts quantized (quant.json): then every part must be, in one scheme,
and the unit holds their components stacked the same way (rows are independent in both
schemes, so a fused unit of quantized parts is the quantized fused unit).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from edgeserve.arch.plan import WeightUnit
from edgeserve.arch.spec import ModelFormatError
from edgeserve.checkpoint import TensorInfo
from edgeserve.quant.format import QuantInfo, parts, shapes
from edgeserve.quant.layout import QuantLayout
from edgeserve.tiers import DiskJob


def unit_schemes(model_dir: Path, plan: dict[str, WeightUnit],
                 info: QuantInfo | None) -> dict[str, str]:
    """Unit name -> scheme for the units stored quantized; ModelFormatError for a unit
    whose parts are stored in different ways."""
    if info is None:
        return {}
    out = {}
    for name, unit in plan.items():
        found = {info.tensors.get(p) for p in unit.parts}
        if found == {None}:
            continue
        if len(found) > 1:
            kinds = ", ".join(f"{p}: {info.tensors.get(p) or 'float'}" for p in unit.parts)
            raise ModelFormatError(f"{model_dir}: the tensors of unit '{name}' must be stored "
                                   f"alike, but are {kinds}")
        out[name] = found.pop() or ""
    return out


def unit_nbytes(unit: WeightUnit, scheme: str | None, dtype: torch.dtype) -> int:
    if scheme:
        return QuantLayout(scheme, unit.shape).nbytes
    return math.prod(unit.shape) * dtype.itemsize


def check_parts(model_dir: Path, unit: WeightUnit, scheme: str,
                tensors: dict[str, TensorInfo]) -> None:
    """Every component of every part present, with the shape and dtype the unit implies."""
    for part, _, rows in unit.slices():
        want = shapes(scheme, (rows, *unit.shape[1:]))
        for comp, name in parts(part, scheme).items():
            t = tensors.get(name)
            if t is None:
                raise ModelFormatError(f"{model_dir}: checkpoint lacks tensor '{name}' "
                                       f"({scheme} weight '{part}')")
            shape, dtype = want[comp]
            if t.shape != shape:
                raise ModelFormatError(f"{t.path}: tensor '{name}' has shape {t.shape}, "
                                       f"config.json implies {shape}")
            if t.dtype != dtype:
                raise ModelFormatError(f"{t.path}: tensor '{name}' is {t.dtype}, "
                                       f"{scheme} {comp} needs {dtype}")


def disk_jobs(unit: WeightUnit, scheme: str, tensors: dict[str, TensorInfo],
              raw: torch.Tensor) -> list[DiskJob]:
    """The reads that fill a quantized unit's bytes (raw: its uint8 view)."""
    views = QuantLayout(scheme, unit.shape).views(raw)
    jobs = []
    for part, first, rows in unit.slices():
        for comp, name in parts(part, scheme).items():
            jobs.append(DiskJob(tensors[name], views[comp][first:first + rows]))
    return jobs


def part_hash(part: str, scheme: str | None, hashes: dict[str, str],
              info: QuantInfo | None) -> str:
    """The content hash standing for one part of a unit: its source tensor's when known
    (edgeserve's own quantization records it), else that of its stored components."""
    if info is not None and part in info.hashes:
        return info.hashes[part]
    if not scheme:
        return hashes[part]
    h = hashlib.blake2b(digest_size=16)
    for name in parts(part, scheme).values():
        h.update(hashes[name].encode())
    return h.hexdigest()
