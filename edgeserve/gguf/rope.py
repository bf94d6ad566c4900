"""Llama 3's rotary scaling recovered from llama.cpp's `rope_freqs` table.

llama.cpp's converter stores Llama 3.1+'s frequency scaling as one divisor per rotary
frequency, not as its parameters. Per frequency of wavelength w (o = the original context,
l / h = the low / high frequency factors, F = the factor):

    w < o / h          divisor 1
    w > o / l          divisor F
    otherwise          divisor 1 / ((1 - s) / F + s),   s = (o / w - l) / (h - l)

F is the largest divisor. The blended band gives s linear in 1 / w, hence l and h; when it
holds fewer than two frequencies, any l, h with the bands' edges between the observed
wavelengths give the same divisors. The parameters found are checked by recomputing the
table from them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edgeserve.gguf.reader import GGUFError, GGUFFile

MARGIN = 1.01       # band edges put this far beyond the nearest observed wavelength


def llama3_scaling(f: GGUFFile, table: torch.Tensor, head_dim: int) -> dict[str, Any]:
    """config.json's rope_scaling for the divisors `table` (one per frequency)."""
    theta = float(f.arch("rope.freq_base", 10000.0))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = (2 * math.pi / freqs).tolist()
    divisors = table.double().flatten().tolist()
    if len(divisors) != len(wavelen):
        raise GGUFError(f"{f.path}: 'rope_freqs' has {len(divisors)} entries, the head size "
                        f"implies {len(wavelen)}")
    factor = max(divisors)
    orig = float(f.arch("rope.scaling.original_context_length",
                        f.arch("context_length", 8192)))
    short = [w for w, d in zip(wavelen, divisors, strict=True) if math.isclose(d, 1.0)]
    long = [w for w, d in zip(wavelen, divisors, strict=True) if math.isclose(d, factor)]
    band = [(orig / w, (1 / d - 1 / factor) / (1 - 1 / factor))
            for w, d in zip(wavelen, divisors, strict=True)
            if not (math.isclose(d, 1.0) or math.isclose(d, factor))]
    low_edge = min([w for w, _ in zip(wavelen, divisors, strict=True)
                    if w not in short], default=max(wavelen) * 2) / MARGIN
    low = orig / low_edge if not long else orig / (min(long) / MARGIN)
    if len(band) >= 2:                       # s = (x - low) / (high - low), x = o / w
        (x0, s0), (x1, s1) = band[0], band[-1]
        slope = (s1 - s0) / (x1 - x0)
        low = x0 - s0 / slope
        high = low + 1 / slope
    elif band:
        x, s = band[0]
        high = low + (x - low) / s if s > 0 else orig / (max(short, default=1.0) * MARGIN)
    else:
        high = orig / (max(short, default=min(wavelen) / 2) * MARGIN)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": int(orig)}
    if _divisors(wavelen, scaling) != _rounded(divisors):
        raise GGUFError(f"{f.path}: 'rope_freqs' is not a Llama 3 rotary scaling table")
    return scaling


def _divisors(wavelen: list[float], p: dict[str, Any]) -> list[float]:
    orig, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"],
                               p["high_freq_factor"], p["factor"])
    out = []
    for w in wavelen:
        if w < orig / high:
            out.append(1.0)
        elif w > orig / low:
            out.append(factor)
        else:
            s = (orig / w - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return _rounded(out)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]
