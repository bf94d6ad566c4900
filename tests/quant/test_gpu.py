"""CUDA paths of the quantized matmuls against the CPU's (need a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from edgeserve.quant.format import quantize
from edgeserve.quant.linear import QWeight, linear


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_linear_matches_cpu(scheme: str, rows: int, dtype: torch.dtype) -> None:
    w, x = torch.randn(256, 512), torch.randn(rows, 512)
    parts = quantize(scheme, w)
    cpu = QWeight.of(scheme, parts)
    gpu = QWeight.of(scheme, {k: v.cuda() for k, v in parts.items()})
    want = torch.nn.functional.linear(x, cpu.dequantize())
    got = linear(x.cuda().to(dtype), gpu).float().cpu()
    # Both devices multiply float activations by the stored values in float32: float32
    # rounding only, and bfloat16's rounding of the input and output (2^-9 each).
    assert float((got - want).norm() / want.norm()) < (0.01 if dtype == torch.bfloat16 else 1e-4)
    assert float((linear(x, cpu) - want).norm() / want.norm()) < 1e-5
