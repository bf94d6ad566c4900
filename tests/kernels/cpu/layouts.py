"""Quantized weights in the kernels' layouts, with the float weight they stand for."""

from __future__ import annotations

import torch


def quantized(n: int, k: int, bits: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random codes, scales and minimums in the layout, and the weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256 if bits == 8 else 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    low = (torch.rand(n, k // 32, generator=g) - 0.5).half()
    w = (codes.float().view(n, -1, 32) * scale.float()[..., None]
         + low.float()[..., None]).view(n, k)
    stored = codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)
    return stored.contiguous(), scale, low, w
