"""How an offloaded expert unit's bytes are held and read: the same form in host memory, in
the pool and in a copy between them.

A float expert is a tensor of its shape in the compute dtype. A quantized one (int8 or int4,
quant/format.py) is the unit's raw bytes, uint8 (nbytes,), its components back to back
(quant/layout.py): a miss copies exactly the bytes the pool holds, 2-4x fewer than a float
expert's, and the matmul reads the copy in place, wherever it is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from edgeserve.arch.dense import Weight
from edgeserve.pool import BlockPool, Unit
from edgeserve.quant.layout import QuantLayout
from edgeserve.quant.linear import QWeight


class ExpertForm(NamedTuple):
    shape: tuple[int, ...]          # the weight's logical shape (out, in)
    dtype: torch.dtype              # the compute dtype (float experts)
    scheme: str | None = None       # "int8" | "int4" for a quantized expert

    @property
    def held(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the tensor that holds the unit's bytes."""
        if self.scheme:
            return (QuantLayout(self.scheme, self.shape).nbytes,), torch.uint8
        return self.shape, self.dtype

    @property
    def nbytes(self) -> int:
        shape, dtype = self.held
        return math.prod(shape) * dtype.itemsize

    def view(self, pool: BlockPool, unit: Unit) -> torch.Tensor:
        """The unit's bytes in this form (stale after the pool compacts)."""
        shape, dtype = self.held
        return pool.view(unit, dtype, shape)

    def weight(self, data: torch.Tensor) -> Weight:
        """What the matmul reads: data itself, or the quantized weight over its bytes."""
        if not self.scheme:
            return data
        return QWeight.of(self.scheme, QuantLayout(self.scheme, self.shape).views(data))

    def floats(self, data: torch.Tensor) -> torch.Tensor:
        """The weight's values in float (expert similarity only)."""
        w = self.weight(data)
        return w.dequantize() if isinstance(w, QWeight) else w
