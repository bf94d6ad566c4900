"""Rotary position embeddings: inverse frequencies for each scaling type, and their use."""

from __future__ import annotations

import math

import torch

from edgeserve.arch.spec import RopeSpec


def inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies, scaled as the rope type says."""
    freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if rope.kind == "linear":
        return freq / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = ((rope.original_max_positions / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return freq


def cos_sin(freq: torch.Tensor, positions: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, S) -> cos, signed sin (B, S, 1, head_dim), computed in float32.

    The sin's first half is negated, so that `apply` rotates with one flip of the halves
    instead of negating one half and concatenating: -a * s == a * -s exactly, so the
    result is bit for bit `x * cos + rotate_half(x) * sin` (Hugging Face's formula).
    """
    angles = positions.to(torch.float32)[..., None] * freq      # (B, S, hd/2)
    sin, cos = angles.sin(), angles.cos()
    cos = torch.cat((cos, cos), dim=-1)
    return cos[:, :, None, :].to(dtype), torch.cat((-sin, sin), dim=-1)[:, :, None, :].to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, hd) rotated by position (cos and signed sin from `cos_sin`)."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)      # (x2, x1)
    return x * cos + swapped * sin
