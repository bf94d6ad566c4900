"""Rotary embeddings: the flip with a signed sin is Hugging Face's formula bit for bit."""

from __future__ import annotations

import pytest
import torch

from edgeserve.arch import rope


def hf_rotary(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin."""
    angles = positions.to(torch.float32)[..., None] * freq
    emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_is_bit_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)
    positions = torch.randint(0, 8000, (3, 5), generator=gen)
    x = torch.randn(3, 5, 12, 64, generator=gen).to(dtype)
    cos, sin = rope.cos_sin(freq, positions, dtype)
    assert torch.equal(rope.apply(x, cos, sin), hf_rotary(x, positions, freq))
