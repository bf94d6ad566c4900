"""Matmuls over quantized weights read in place: no dequantized copy of a weight is kept.

Both schemes store w = code * scale + min per group of 32 along the input (quant/format.py),
so for an input row x

    x . w[o] = sum_g scale[o, g] * (x_g . code[o, g]) + sum_g min[o, g] * sum(x_g)

The second term is one small float matmul of the per-group sums of x. The first is
computed in float32 on slices of output rows: codes converted to float, scaled per group
and multiplied, so only one slice is ever dequantized (see SLICE). The activations stay in
float throughout (rounding them to int8 per token, as integer matmuls need, cost a real
model several points of top-1 agreement). int4's slices on the CPU take the even and odd
columns apart (the low and high nibbles of its bytes) so that no slice is interleaved back.
Everything here is plain torch, so CUDA takes the same paths. On the CPU, a float32 product
of up to 512 rows (decode, short prefills; QUANT_ROWS) goes to the C kernels of
kernels/cpu/matmul.py instead, which expand the codes in registers and stream each weight
once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeserve.kernels.cpu import matmul as cpu
from edgeserve.quant.format import GROUP, codes_of, dequantize

SLICE = 1 << 18          # weights dequantized at once by the slice-wise paths


@dataclass(frozen=True, slots=True)
class QWeight:
    """A quantized weight (..., out, in): views of one pool unit (see quant/layout.py)."""

    scheme: str
    qweight: torch.Tensor           # uint8 (..., out, in) int8 | (..., out, in // 2) int4
    scale: torch.Tensor             # float16 (..., out, in // 32)
    min: torch.Tensor               # float16 (..., out, in // 32)

    @classmethod
    def of(cls, scheme: str, views: dict[str, torch.Tensor]) -> QWeight:
        return cls(scheme, views["qweight"], views["scale"], views["min"])

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, inner = self.qweight.shape
        return (*lead, inner * 2) if self.scheme == "int4" else (*lead, inner)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def __getitem__(self, index: int) -> QWeight:
        """One matrix of a stack (E, out, in): experts stored stacked."""
        return QWeight(self.scheme, self.qweight[index], self.scale[index], self.min[index])

    def parts(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scale": self.scale, "min": self.min}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight in float (reference and tests only)."""
        return dequantize(self.scheme, self.parts()).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ids (...,) of a 2-D weight, dequantized: (..., in). Embedding lookups."""
        flat = ids.reshape(-1)
        picked = {k: v.index_select(0, flat) for k, v in self.parts().items()}
        return dequantize(self.scheme, picked).to(dtype).view(*ids.shape, self.shape[-1])

    def chunks(self, ids: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Pieces of a 2-D weight seen as (out * in / width, width) rows: the rows ids (n,),
        dequantized, (n, width). Task blocks read the base's values this way."""
        per_byte = 2 if self.scheme == "int4" else 1
        if (width % GROUP == 0 or GROUP % width == 0) and width % per_byte == 0:
            # Whole groups per piece, or whole pieces per group: codes and group values
            # are picked row by row without touching the rest of the weight.
            groups = max(1, width // GROUP)
            at = ids if width >= GROUP else ids * width // GROUP
            picked = {"qweight": self.qweight.reshape(-1, width // per_byte).index_select(0, ids),
                      "scale": self.scale.reshape(-1, groups).index_select(0, at),
                      "min": self.min.reshape(-1, groups).index_select(0, at)}
            codes = codes_of(self.scheme, picked["qweight"]).float().view(len(ids), groups, -1)
            w = codes * picked["scale"].float()[..., None] + picked["min"].float()[..., None]
            return w.view(len(ids), width).to(dtype)
        per_row = self.shape[-1] // width
        whole = self.rows(ids // per_row, dtype)                          # (n, in)
        cols = (ids % per_row)[:, None] * width + torch.arange(width, device=ids.device)
        return whole.gather(1, cols)


def linear(x: torch.Tensor, w: QWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w.T (+ b) -> (..., out) in x's dtype."""
    if w.scheme not in ("int8", "int4"):
        raise ValueError(f"unknown quantization scheme {w.scheme!r}")
    fast = cpu.few_rows_quantized(x, w.scheme, w.qweight, w.scale, w.min, b)
    if fast is not None:
        return fast
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    y = matmul(x2, w)
    if b is not None:
        y = y + b
    return y.view(*lead, y.shape[-1])


def matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x (M, K) float @ quantized weight (N, K) -> (M, N) in x's dtype."""
    m, k = x.shape
    xf = x.float()
    halves = w.scheme == "int4" and x.device.type == "cpu"
    y = _int4_halves(xf, w) if halves else _sliced(xf, w)
    sums = xf.view(m, k // GROUP, GROUP).sum(-1)                            # (M, G)
    return torch.addmm(y, sums, w.min.t().float()).to(x.dtype)


def _int4_halves(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """sum_g scale[:, g] * (x_g . code_g) for int4, a slice of output rows at a time: the
    slice's low and high nibbles (the even and odd columns) are scaled per group and
    multiplied by the even and odd columns of x, so that no slice is interleaved back."""
    m, k = x.shape
    n, g, half = w.qweight.shape[0], k // GROUP, GROUP // 2
    even, odd = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()            # (M, K/2)
    out = x.new_empty(m, n)
    step = max(1, SLICE // k)
    for first in range(0, n, step):
        part = slice(first, min(n, first + step))
        scale = w.scale[part, :, None].float()                             # (n, G, 1)
        acc = None
        for cols, shift in ((even, 0), (odd, 4)):
            piece = _nibbles(w.qweight[part], shift).view(-1, g, half).float() * scale
            y = torch.mm(cols, piece.view(-1, k // 2).t())
            acc = y if acc is None else acc.add_(y)
        assert acc is not None
        out[:, part] = acc
    return out


def _nibbles(packed: torch.Tensor, shift: int) -> torch.Tensor:
    """The low (shift 0) or high (shift 4) nibbles of packed bytes (N, K/2) as uint8 codes,
    four bytes per int32 operation."""
    if packed.shape[-1] % 4 == 0 and packed.data_ptr() % 4 == 0 and packed.is_contiguous():
        words = packed.view(torch.int32)
        return ((words >> shift if shift else words) & 0x0F0F0F0F).view(torch.uint8)
    return (packed >> shift if shift else packed) & 15


def _sliced(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """sum_g scale[:, g] * (x_g . code_g) in float32, a slice of output rows at a time:
    the slice's codes converted to float and scaled per group (its minimums are left to
    the caller, which adds them to all rows at once)."""
    n, k = w.shape[-2], w.shape[-1]
    out = x.new_empty(x.shape[0], n)
    step = max(1, SLICE // k)
    for first in range(0, n, step):
        part = slice(first, min(n, first + step))
        codes = codes_of(w.scheme, w.qweight[part]).view(-1, k // GROUP, GROUP).float()
        piece = (codes * w.scale[part, :, None].float()).view(-1, k)
        torch.mm(x, piece.t(), out=out[:, part])
    return out
