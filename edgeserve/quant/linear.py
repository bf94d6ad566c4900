"""Matmuls over quantized weights read in place: no dequantized copy of a weight is kept.

int8 (per output channel): the activations are quantized per token to int8 and multiplied
by the int8 weight with torch's integer matmul (`_int_mm`, over a transposed view of the
weight), the int32 result scaled by both scales. Where `_int_mm` cannot run (CUDA with few
rows, odd sizes) the product goes through plain torch in the compute dtype, a slice of
output rows at a time.

int4 (groups of 32, scale and minimum): w = code * scale + min, so

    x . w[o] = sum_g scale[o, g] * (x_g . code[o, g]) + sum_g min[o, g] * sum(x_g)

The second term is one small float matmul of the per-group sums of x. The first is
computed on slices of output rows: codes unpacked to the compute dtype, scaled per group
and multiplied, so only one slice is ever dequantized (see ROWS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeserve.quant.format import GROUP, dequantize, unpack_int4

SLICE = 1 << 18          # weights dequantized at once by the slice-wise paths
FEW_ROWS = 2             # int4 with up to this many rows: integer dot products per group
# Activation columns kept out of the per-token int8 rounding and multiplied in float: an
# LLM's hidden states have a few channels far larger than the rest, which would otherwise
# set every token's scale (on SmolLM2 they take top-1 agreement from 81% to 92%).
OUTLIERS = 16


@dataclass(frozen=True, slots=True)
class QWeight:
    """A quantized weight (..., out, in): views of one pool unit (see quant/layout.py)."""

    scheme: str
    qweight: torch.Tensor           # int8 (..., out, in) | uint8 (..., out, in // 2)
    scale: torch.Tensor             # float32 (..., out) | (..., out, in // 32)
    min: torch.Tensor | None = None  # int4: float32 (..., out, in // 32)

    @classmethod
    def of(cls, scheme: str, views: dict[str, torch.Tensor]) -> QWeight:
        return cls(scheme, views["qweight"], views["scale"], views.get("min"))

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, inner = self.qweight.shape
        return (*lead, inner * 2) if self.scheme == "int4" else (*lead, inner)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def __getitem__(self, index: int) -> QWeight:
        """One matrix of a stack (E, out, in): experts stored stacked."""
        low = self.min[index] if self.min is not None else None
        return QWeight(self.scheme, self.qweight[index], self.scale[index], low)

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scale": self.scale}
        return out | ({"min": self.min} if self.min is not None else {})

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
        per_row = self.shape[-1] // width
        if self.scheme == "int8":
            codes = self.qweight.reshape(-1, width).index_select(0, ids)
            return (codes.to(dtype) * self.scale.index_select(0, ids // per_row)[:, None]
                    .to(dtype))
        if width % GROUP == 0:
            assert self.min is not None
            picked = {"qweight": self.qweight.reshape(-1, width // 2).index_select(0, ids),
                      "scale": self.scale.reshape(-1, width // GROUP).index_select(0, ids),
                      "min": self.min.reshape(-1, width // GROUP).index_select(0, ids)}
            return dequantize("int4", picked).to(dtype)
        whole = self.rows(ids // per_row, dtype)                          # (n, in)
        cols = (ids % per_row)[:, None] * width + torch.arange(width, device=ids.device)
        return whole.gather(1, cols)


def linear(x: torch.Tensor, w: QWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w.T (+ b) -> (..., out) in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if w.scheme == "int8":
        y = int8_matmul(x2, w)
    elif w.scheme == "int4":
        y = int4_matmul(x2, w)
    else:
        raise ValueError(f"unknown quantization scheme {w.scheme!r}")
    if b is not None:
        y = y + b
    return y.view(*lead, y.shape[-1])


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: x (M, K) -> codes (M, K) int8, scales (M, 1) float32."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True,
                                     dtype=torch.float32).clamp_(min=1e-30) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


def _int_mm_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    # CUDA (cuBLASLt): more than 16 rows, sizes multiples of 8.
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int8_matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x (M, K) float @ int8 weight (N, K) -> (M, N) in x's dtype."""
    m, k = x.shape
    n = w.qweight.shape[0]
    if not _int_mm_ok(m, k, n, x.device):
        if x.device.type == "cuda" and k % 8 == 0 and n % 8 == 0:
            pad = x.new_zeros(17 - m, k) if m <= 16 else None      # CUDA: pad to 17 rows
            if pad is not None:
                return int8_matmul(torch.cat((x, pad)), w)[:m]
        return _sliced(x, w)
    rest, idx, big = _outliers(x)
    codes, scale = quantize_tokens(rest)
    acc = torch._int_mm(codes, w.qweight.t())                           # (M, N) int32
    y = acc * scale * w.scale
    if idx is not None:
        y = y.addmm_(big.float(), _columns(w, idx).t())
    return y.to(x.dtype)


def _outliers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x (M, K) without its OUTLIERS largest columns (zeroed), their indices and values;
    x itself (and None) where K is too small to single any out."""
    if x.shape[1] <= 4 * OUTLIERS:
        return x, None, x
    idx = torch.topk(x.abs().amax(0), OUTLIERS).indices                    # (k,)
    return x.index_fill(1, idx, 0.0), idx, x.index_select(1, idx)


def _columns(w: QWeight, idx: torch.Tensor) -> torch.Tensor:
    """Columns idx of the weight (N, k) in float32, without int4's minimums."""
    if w.scheme == "int8":
        return w.qweight.index_select(1, idx).float() * w.scale[:, None]
    shifts = ((idx % 2) * 4).to(torch.uint8)
    codes = (w.qweight.index_select(1, idx // 2) >> shifts) & 15             # (N, k)
    return codes.float() * w.scale.index_select(1, idx // GROUP)


def int4_matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x (M, K) float @ int4 weight (N, K) -> (M, N) in x's dtype."""
    assert w.min is not None
    m, k = x.shape
    if m <= FEW_ROWS and x.device.type == "cpu":
        y = _int4_integer(x, w)
    elif x.device.type == "cpu":
        y = _int4_halves(x, w)
    else:
        y = _sliced(x.float(), w, minimums=False)
    sums = x.float().view(m, k // GROUP, GROUP).sum(-1)                      # (M, G)
    return torch.addmm(y, sums, w.min.t()).to(x.dtype)


def _int4_integer(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """sum_g scale[:, g] * (x_g . code_g) with integer dot products, for a few rows: the
    tokens' int8 codes are laid out block-diagonally, one row per (token, group), so that
    one `_int_mm` gives every group's dot products. Even and odd columns go separately:
    they are the low and high nibbles of the packed bytes, so no interleaving is needed."""
    m, k = x.shape
    n, g = w.qweight.shape[0], k // GROUP
    rest, idx, big = _outliers(x)
    codes, scale = quantize_tokens(rest)                                     # (M, K)
    eye = _eye(g, x.device)                                                  # (G, G, 1)
    half = GROUP // 2
    acc = None
    for cols, nibbles in ((codes[:, 0::2], _nibbles(w.qweight, 0)),
                          (codes[:, 1::2], _nibbles(w.qweight, 4))):
        blocks = (eye * cols.reshape(m, 1, g, half)).view(m * g, k // 2)     # (M G, K/2)
        part = torch._int_mm(blocks, nibbles.t())                            # (M G, N)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None
    y = torch.linalg.vecdot(acc.view(m, g, n).transpose(1, 2).float(), w.scale)   # (M, N)
    y = y.mul_(scale)
    return y if idx is None else y.addmm_(big.float(), _columns(w, idx).t())


def _int4_halves(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """sum_g scale[:, g] * (x_g . code_g) for many rows, a slice of output rows at a time:
    the slice's low and high nibbles (the even and odd columns) are scaled per group and
    multiplied by the even and odd columns of x, so that no slice is interleaved back."""
    m, k = x.shape
    n, g, half = w.qweight.shape[0], k // GROUP, GROUP // 2
    dt = torch.float32
    even, odd = x[:, 0::2].to(dt), x[:, 1::2].to(dt)                       # (M, K/2)
    out = x.new_empty(m, n, dtype=torch.float32)
    step = max(1, SLICE // k)
    for first in range(0, n, step):
        part = slice(first, min(n, first + step))
        scale = w.scale[part, :, None].to(dt)                              # (n, G, 1)
        acc = None
        for cols, shift in ((even, 0), (odd, 4)):
            piece = (_nibbles(w.qweight[part], shift).view(-1, g, half).to(dt) * scale)
            y = torch.mm(cols, piece.view(-1, k // 2).t())
            acc = y if acc is None else acc.add_(y)
        assert acc is not None
        out[:, part] = acc
    return out


def _nibbles(packed: torch.Tensor, shift: int) -> torch.Tensor:
    """The low (shift 0) or high (shift 4) nibbles of packed bytes (N, K/2) as int8 codes,
    four bytes per int32 operation."""
    if packed.shape[-1] % 4 == 0 and packed.data_ptr() % 4 == 0 and packed.is_contiguous():
        words = packed.view(torch.int32)
        return ((words >> shift if shift else words) & 0x0F0F0F0F).view(torch.int8)
    return ((packed >> shift if shift else packed) & 15).view(torch.int8)


_EYES: dict[tuple[int, str], torch.Tensor] = {}


def _eye(g: int, device: torch.device) -> torch.Tensor:
    key = (g, str(device))
    if key not in _EYES:
        _EYES[key] = torch.eye(g, dtype=torch.int8, device=device)[:, :, None]
    return _EYES[key]


def _sliced(x: torch.Tensor, w: QWeight, minimums: bool = True) -> torch.Tensor:
    """Plain torch: slices of output rows dequantized to x's dtype, one at a time (int4
    without its minimums' term when minimums is False: the caller adds it to all rows)."""
    n, k = w.shape[-2], w.shape[-1]
    out = x.new_empty(x.shape[0], n)
    step = max(1, SLICE // k)
    for first in range(0, n, step):
        part = slice(first, min(n, first + step))
        if w.scheme == "int8":
            piece = w.qweight[part].to(x.dtype) * w.scale[part, None].to(x.dtype)
        else:
            codes = unpack_int4(w.qweight[part]).view(-1, k // GROUP, GROUP).to(x.dtype)
            scaled = codes * w.scale[part, :, None].to(x.dtype)
            if minimums and w.min is not None:
                scaled += w.min[part, :, None].to(x.dtype)
            piece = scaled.view(-1, k)
        torch.mm(x, piece.t(), out=out[:, part])
    return out
