"""How a quantized weight sits in one pool unit: its components back to back.

    | qweight | pad | scale | pad | min (int4) |      each component 64-byte aligned

A unit is thus one content-addressed run of blocks like any float weight, and its views
are plain strided tensors (the matmul reads them in place).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from edgeserve.quant.format import PARTS, shapes

ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class QuantLayout(NamedTuple):
    scheme: str                      # "int8" | "int4"
    shape: tuple[int, ...]           # the weight's logical shape (..., out, in)

    def components(self) -> list[tuple[str, tuple[int, ...], torch.dtype, int]]:
        """(component, shape, dtype, byte offset) in unit order."""
        out, offset = [], 0
        specs = shapes(self.scheme, self.shape)
        for name in PARTS[self.scheme]:
            shape, dtype = specs[name]
            out.append((name, shape, dtype, offset))
            offset += _aligned(math.prod(shape) * dtype.itemsize)
        return out

    @property
    def nbytes(self) -> int:
        *_, (_, shape, dtype, offset) = self.components()
        return offset + math.prod(shape) * dtype.itemsize

    def views(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Component name -> view of raw (the unit's uint8 bytes)."""
        out = {}
        for name, shape, dtype, offset in self.components():
            n = math.prod(shape) * dtype.itemsize
            out[name] = raw[offset:offset + n].view(dtype).view(shape)
        return out
