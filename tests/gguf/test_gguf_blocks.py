"""GGUF blocks decoded by edgeserve against the gguf package's own dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import random_blocks

from edgeserve.gguf import blocks
from edgeserve.gguf.reader import SUPPORTED_TYPES, GGUFTensor
from edgeserve.quant.format import dequantize as dequantize_scheme
from edgeserve.quant.format import pack_int4, quantize_int8

SHAPE = (48, 512)             # two Q*_K super-blocks per row


def sample(kind: str) -> GGUFTensor:
    """A tensor of `kind`: real quantization of random weights where the gguf package can
    quantize, random valid blocks otherwise."""
    w = np.random.default_rng(1).normal(0, 0.05, SHAPE).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        data = random_blocks(kind, SHAPE)
    elif kind == "F32":
        data = w
    elif kind == "F16":
        data = w.astype(np.float16)
    else:
        data = gguf.quants.quantize(w, qtype)
    return GGUFTensor("blk.0.ffn_up.weight", kind, SHAPE, data)


def reference(t: GGUFTensor) -> torch.Tensor:
    values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type])
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(t.shape)


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_dequantize_matches_the_gguf_package(kind):
    t = sample(kind)
    expected = reference(t)
    assert expected.abs().max() > 0
    torch.testing.assert_close(blocks.dequantize(t), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", blocks.INT4_TYPES)
def test_int4_types_map_onto_edgeserve_int4(kind):
    """Q4_0 and Q4_1 exactly; Q4_K with its group scales rounded to float16."""
    t = sample(kind)
    q = blocks.int4(t)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scale.shape == q.min.shape == (SHAPE[0], SHAPE[1] // 32)
    assert q.scale.dtype == q.min.dtype == torch.float16
    stored = {"qweight": pack_int4(q.codes), "scale": q.scale, "min": q.min}
    got, want = dequantize_scheme("int4", stored), reference(t)
    if kind == "Q4_K":
        # Each value moves by at most code * |d scale| + |d min|, both float16 roundings
        # (2^-11 relative): at most 16 * 2^-11 of the group's step and minimum.
        assert 0 < float((got - want).norm() / want.norm()) < 1e-3
    else:
        assert torch.equal(got, want)


def test_q8_0_maps_exactly_onto_edgeserve_int8():
    t = sample("Q8_0")
    q = blocks.int8(t)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == SHAPE
    assert q.scale.dtype == q.min.dtype == torch.float16
    assert torch.equal(q.min, q.scale * -128)
    stored = {"qweight": q.codes, "scale": q.scale, "min": q.min}
    assert torch.equal(dequantize_scheme("int8", stored), reference(t))


@pytest.mark.parametrize("kind", ["Q5_K", "Q6_K", "Q4_0"])
def test_requantized_types_lose_under_half_a_percent(kind):
    """int8 in groups of 32: within half a step of 1/255 of each group's range."""
    w = reference(sample(kind))
    back = dequantize_scheme("int8", quantize_int8(blocks.dequantize(sample(kind))))
    assert float((back - w).norm() / w.norm()) < 0.005
