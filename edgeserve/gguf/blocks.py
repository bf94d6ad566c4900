"""GGUF tensor blocks decoded into edgeserve's weight layouts (quant/format.py).

| GGUF type        | edgeserve linear weight | how                                              |
| ---------------- | ----------------------- | ------------------------------------------------ |
| F32, F16, BF16   | float (its own dtype)   | as stored                                        |
| Q8_0             | int8                    | exact: code = q + 128, scale = d, min = -128 d   |
| Q4_0, Q4_1       | int4                    | exact: the same codes, scales and minimums       |
| Q4_K             | int4                    | its group scales and minimums rounded to float16 |
|                  |                         | (codes re-chosen for them): near-exact           |
| Q5_K, Q6_K       | int8                    | re-quantized from the dequantized values         |

Q8_0 block (32 weights): f16 d, 32 signed bytes q; w = d q.
Q4_0 block (32 weights): f16 d, 16 bytes of codes; w = d (q - 8).
Q4_1 block (32 weights): f16 d, f16 m, 16 bytes of codes; w = d q + m.
    Byte j holds weight j (low nibble) and weight j + 16 (high nibble).
Q4_K super-block (256 weights = 8 groups of 32): f16 d, f16 dmin, 12 bytes of 6-bit group
    scales and minimums, 128 bytes of codes; w = d sc[g] q - dmin m[g]. The codes come in 4
    chunks of 32 bytes: chunk c holds group 2c in its low nibbles, group 2c + 1 in its high.
Other types are dequantized by the `gguf` package itself.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from edgeserve.gguf.reader import GGUFTensor
from edgeserve.quant.format import GROUP, encode

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q5_K", "Q6_K")
EXACT_TYPES = ("Q8_0", "Q4_0", "Q4_1")     # map onto edgeserve's schemes bit for bit


class Grouped(NamedTuple):
    codes: torch.Tensor      # uint8 [rows, cols]: 0..15 (int4) or 0..255 (int8)
    scale: torch.Tensor      # float16 [rows, cols // 32]
    min: torch.Tensor        # float16 [rows, cols // 32]; w = code * scale + min


# Byte work is done in numpy: torch's uint8 shifts and masks are 20x slower on the CPU.
def _blocks(t: GGUFTensor, nbytes: int) -> np.ndarray:
    """The tensor's bytes as (rows, blocks per row, block bytes), flattened leading dims."""
    rows = int(np.prod(t.shape[:-1]))
    return np.asarray(t.data, dtype=np.uint8).reshape(rows, -1, nbytes)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """(..., 2) bytes -> (...) float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0]
                            .astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _int4_parts(t: GGUFTensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Codes (.., 32-code groups), float32 scales and minimums of a Q4_0 / Q4_1 / Q4_K
    tensor, exactly."""
    if t.type == "Q4_0":
        b = _blocks(t, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]), d, -8.0 * d
    if t.type == "Q4_1":
        b = _blocks(t, 20)
        return _nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4])
    if t.type == "Q4_K":
        b = _blocks(t, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, m = _k_scales(b[..., 4:16])                          # (rows, nb, 8) each
        qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)            # 4 chunks of 32 bytes
        codes = np.stack([qs & 0x0F, qs >> 4], axis=-2)          # (rows, nb, 4, 2, 32)
        return codes, d.unsqueeze(-1) * sc, -(dmin.unsqueeze(-1) * m)
    raise ValueError(f"{t.name}: {t.type} is not an int4 type ({', '.join(INT4_TYPES)})")


def _groups(t: GGUFTensor, codes: np.ndarray, scale: torch.Tensor, low: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols) codes and (rows, cols // 32) float32 scales and minimums."""
    rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
    return (torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))),
            scale.reshape(rows, cols // GROUP).contiguous(),
            low.reshape(rows, cols // GROUP).contiguous())


def int4(t: GGUFTensor) -> Grouped:
    """A Q4_0 / Q4_1 / Q4_K tensor as int4: exactly for Q4_0 and Q4_1 (float16 scales and
    minimums already); Q4_K's products of a float16 and a 6-bit integer rounded to float16,
    its codes re-chosen as the nearest for the rounded values."""
    codes, scale, low = _groups(t, *_int4_parts(t))
    scale16, low16 = scale.half(), low.half()
    if t.type == "Q4_K":
        w = codes.float().view(*scale.shape, GROUP) * scale[..., None] + low[..., None]
        codes = encode(w, scale16, low16, 15).reshape(codes.shape)
    return Grouped(codes, scale16, low16)


def int8(t: GGUFTensor) -> Grouped:
    """A Q8_0 tensor as int8, exactly: code = q + 128, scale = d, min = -128 d."""
    if t.type != "Q8_0":
        raise ValueError(f"{t.name}: {t.type} is not Q8_0")
    b = _blocks(t, 34)
    d = torch.from_numpy(np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].copy())
    codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
    return Grouped(torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))),
                   d.reshape(rows, cols // GROUP).contiguous(),
                   (d * -128).reshape(rows, cols // GROUP).contiguous())


def _k_scales(s: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> 8 six-bit group scales and 8 six-bit group minimums (float32).
    Bytes 0-3: scales 0-3 (low 6 bits), bytes 4-7: minimums 0-3; bytes 8-11 hold the low
    4 bits of scales 4-7 (low nibble) and minimums 4-7 (high nibble), whose top 2 bits are
    the top bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return torch.from_numpy(sc.astype(np.float32)), torch.from_numpy(m.astype(np.float32))


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """The tensor's values as float32, shape t.shape."""
    if t.type in INT4_TYPES:
        codes, scale, low = _groups(t, *_int4_parts(t))
        groups = codes.reshape(scale.shape[0], -1, GROUP).float()
        w = groups * scale.unsqueeze(-1) + low.unsqueeze(-1)
        return w.reshape(t.shape)
    if t.type in ("F32", "F16", "BF16"):
        return float_values(t).float()
    values = gguf_dequantize(t.data, GGMLQuantizationType[t.type])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)


def float_values(t: GGUFTensor) -> torch.Tensor:
    """An F32 / F16 / BF16 tensor in its own dtype (BF16 arrives as raw bytes)."""
    if t.type == "BF16":
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        return raw.view(torch.bfloat16).reshape(t.shape)
    return torch.from_numpy(np.array(t.data)).reshape(t.shape)
