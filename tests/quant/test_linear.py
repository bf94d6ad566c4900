"""Matmuls over quantized weights against fp32, within stated bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeserve.quant.format import quantize
from edgeserve.quant.linear import QWeight, linear

# Relative error (Frobenius) of x @ W^T against fp32 for Gaussian weights and inputs. Only
# the weights are rounded (the activations stay float): to within half a step of 1/255
# (int8) or 1/15 (int4) of each group of 32's range, about 4 sigma for Gaussian groups, so
# an error of about 4 / 255 / sqrt(12) = 0.45% (int8) and 4 / 15 / sqrt(12) = 7.7% (int4)
# on average; the worst of 80 draws of this test's sizes was 0.55% and 10.4%.
BOUND = {"int8": 0.008, "int4": 0.12}


def qweight(scheme: str, w: torch.Tensor) -> QWeight:
    return QWeight.of(scheme, quantize(scheme, w))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_linear_against_fp32(scheme: str, rows: int) -> None:
    torch.manual_seed(rows)
    w, x, b = torch.randn(96, 128), torch.randn(1, rows, 128), torch.randn(96)
    q = qweight(scheme, w)
    y = linear(x, q, b)
    assert y.shape == (1, rows, 96) and y.dtype == torch.float32
    assert rel(y - b, F.linear(x, w)) < BOUND[scheme]
    # Against the dequantized weight: every path multiplies float activations by the
    # stored values in float32, so only float32 rounding remains.
    exact = F.linear(x, q.dequantize(), b)
    assert rel(y, exact) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_inputs_give_bfloat16(scheme: str) -> None:
    w, x = torch.randn(64, 64), torch.randn(4, 64)
    y = linear(x.bfloat16(), qweight(scheme, w))
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), F.linear(x, w)) < BOUND[scheme] + 0.01


def test_outlier_tokens_do_not_disturb_the_others() -> None:
    """One huge row does not crush the others (the activations are not rounded)."""
    w, x = torch.randn(64, 64), torch.randn(2, 64)
    x[0] *= 1000
    y = linear(x, qweight("int8", w))
    assert rel(y[1], F.linear(x[1], w)) < BOUND["int8"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stacked_rows_and_chunks(scheme: str) -> None:
    w = torch.randn(3, 32, 64)
    q = qweight(scheme, w)
    assert q.shape == (3, 32, 64)
    assert torch.equal(q[1].dequantize(), q.dequantize()[1])
    flat = q[2]
    ids = torch.tensor([5, 0, 31])
    assert torch.equal(flat.rows(ids, torch.float32), flat.dequantize()[ids])
    # Pieces of whole groups, of part of a group, and (int4, width 1) of half a byte.
    for width in (64, 32, 16, 8, 1):
        pieces = torch.tensor([0, 3, 7, 32 * 64 // width - 1])
        want = flat.dequantize().reshape(-1, width)[pieces]
        assert torch.allclose(flat.chunks(pieces, width, torch.float32), want)


def test_zero_input_rows() -> None:
    q = qweight("int8", torch.randn(16, 32))
    assert torch.equal(linear(torch.zeros(2, 32), q), torch.zeros(2, 16))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_massive_activation_channels_stay_exact(scheme: str) -> None:
    """A few hidden channels hundreds of times larger than the rest (as in real LLMs) cost
    nothing: activations are multiplied in float, whatever their range."""
    torch.manual_seed(3)
    w, x = torch.randn(64, 256), torch.randn(2, 256)
    x[:, [7, 100]] = 300.0
    q = qweight(scheme, w)
    for rows in (x[:1], x):
        exact = F.linear(rows, q.dequantize())
        assert rel(linear(rows, q), exact) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_few_cpu_rows_take_the_kernels_with_torchs_result(scheme: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeserve.kernels.cpu import matmul as cpu

    torch.manual_seed(3)
    w, x, b = torch.randn(200, 160), torch.randn(2, 3, 160), torch.randn(200)
    q = qweight(scheme, w)
    kernel = cpu.few_rows_quantized(x, scheme, q.qweight, q.scale, q.min, b)
    assert (kernel is not None) == (cpu.library() is not None)
    on = linear(x, q, b)
    with monkeypatch.context() as patch:            # the torch path, kernels switched off
        patch.setenv("EDGESERVE_CPU_KERNELS", "off")
        cpu.reset()
        assert cpu.few_rows_quantized(x, scheme, q.qweight, q.scale, q.min, b) is None
        off = linear(x, q, b)
    cpu.reset()
    assert rel(on, off) < 1e-5
    if kernel is not None:
        torch.testing.assert_close(on, kernel)
