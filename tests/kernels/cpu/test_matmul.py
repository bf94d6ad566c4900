"""The CPU matmul kernels against plain torch: every layout, many row counts, odd sizes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from edgeserve.kernels.cpu import matmul as cpu

from .layouts import quantized

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="needs a C compiler")


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@needs_cc
def test_the_library_is_built_on_first_use():
    cpu.reset()
    lib = cpu.library()
    assert lib is not None and lib.vector_width in (4, 8, 16)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 37), (61, 96), (130, 251), (515, 576)])
def test_float32_every_row_count(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    for m in range(1, 41):
        x = torch.randn(m, k, generator=g)
        close(cpu.linear_f32(x, w), x @ w.t())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (9, 96), (77, 160), (263, 544)])
def test_quantized_every_row_count(bits, n, k):
    stored, scale, low, w = quantized(n, k, bits, seed=n + k + bits)
    fn = cpu.linear_int8 if bits == 8 else cpu.linear_int4
    g = torch.Generator().manual_seed(3)
    for m in range(1, 41):
        x = torch.randn(m, k, generator=g)
        close(fn(x, stored, scale, low), x @ w.t())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_long_rows_and_bias(bits):
    """K of 65 groups (more than the kernels convert at once), N not a multiple of any
    tile, a bias: one row (vec.h), up to 4 (tiles dequantized in registers) and more
    (dequantized once into a buffer)."""
    n, k = 13, 65 * 32
    stored, scale, low, w = quantized(n, k, bits, seed=bits + 20)
    fn = cpu.linear_int8 if bits == 8 else cpu.linear_int4
    g = torch.Generator().manual_seed(21)
    b = torch.randn(n, generator=g)
    for m in (1, 2, 3, 5, 8):
        x = torch.randn(m, k, generator=g)
        close(fn(x, stored, scale, low, b), x @ w.t() + b)


def test_float32_one_row_long_and_odd():
    g = torch.Generator().manual_seed(22)
    for n, k in ((3, 2085), (4099, 19), (9, 16)):
        w, x, b = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g), torch.randn(n)
        close(cpu.linear_f32(x, w, b), x @ w.t() + b)


def test_many_rows():
    """More rows than the decode hooks take: packed activations in many tiles."""
    g = torch.Generator().manual_seed(23)
    w, x = torch.randn(70, 99, generator=g), torch.randn(300, 99, generator=g)
    close(cpu.linear_f32(x, w), x @ w.t())
    for bits, fn in ((8, cpu.linear_int8), (4, cpu.linear_int4)):
        stored, scale, low, wq = quantized(70, 96, bits, seed=bits + 23)
        xq = x[:, :96].contiguous()
        close(fn(xq, stored, scale, low), xq @ wq.t())


@needs_cc
def test_stream_sum_and_read_bandwidth():
    lib = cpu.library()
    assert lib is not None
    x = torch.rand(100_003, generator=torch.Generator().manual_seed(24))
    for threads in (1, 2):
        assert lib.stream_sum(x.data_ptr(), x.numel(), threads) == pytest.approx(
            float(x.double().sum()), rel=1e-5)
    assert cpu.read_bandwidth(1 << 20, 1, reps=1) > 1e8          # bytes/s: over 0.1 GB/s


def test_bias_strides_and_leading_dims():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(45, 200, generator=g)
    w = big[:, 8:168]                                     # row stride 200, K = 160
    b = torch.randn(45, generator=g)
    x = torch.randn(160, 6, generator=g).t()              # (6, 160), column stride 6
    close(cpu.linear_f32(x, w, b), x @ w.t() + b)
    x3 = torch.randn(2, 3, 160, generator=g)[:, :, :]     # (B, S, K) leading dims kept
    out = cpu.linear_f32(x3, w, b)
    assert out.shape == (2, 3, 45)
    close(out, x3 @ w.t() + b)
    b_strided = torch.randn(90, generator=g)[::2]         # added by torch afterwards
    close(cpu.linear_f32(x, w, b_strided), x @ w.t() + b_strided)
    for bits, fn in ((8, cpu.linear_int8), (4, cpu.linear_int4)):
        stored, scale, low, wq = quantized(45, 160, bits, seed=bits)
        close(fn(x, stored, scale, low, b), x @ wq.t() + b)
        close(fn(x3, stored, scale, low), x3 @ wq.t())


def test_thread_counts_agree():
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(1031, 576, generator=g), torch.randn(8, 576, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.linear_f32(x, w)
        torch.set_num_threads(2)
        two = cpu.linear_f32(x, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0)   # rows are split, never sums


def test_shapes_are_checked():
    stored, scale, low, _ = quantized(8, 64, 8, seed=1)
    with pytest.raises(ValueError, match="columns"):
        cpu.linear_int8(torch.randn(2, 32), stored, scale, low)
    with pytest.raises(ValueError, match="scale"):
        cpu.linear_int8(torch.randn(2, 64), stored, scale.float(), low)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.linear_int8(torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.uint8),
                        scale[:, :1], low[:, :1])


def test_only_few_float32_rows_go_to_the_kernel():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    x = torch.randn(2, 3, 32, generator=g)
    y = cpu.few_rows_f32(x, w, b)
    if cpu.library() is None:
        assert y is None
    else:
        assert y is not None and y.shape == (2, 3, 64)
        close(y, x @ w.t() + b)
    assert cpu.few_rows_f32(torch.randn(cpu.ROWS + 1, 32), w) is None
    assert cpu.few_rows_f32(torch.randn(1, 1, 32), w) is None                  # one row: torch
    assert cpu.few_rows_f32(torch.randn(1, 32).bfloat16(), w.bfloat16()) is None
    assert cpu.few_rows_f32(torch.randn(1, 64), w.t()) is None               # column stride
    assert cpu.few_rows_f32(torch.randn(32, 2).t(), w) is None               # x not contiguous


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_few_quantized_rows_go_to_the_kernel(scheme):
    stored, scale, low, w = quantized(70, 96, 8 if scheme == "int8" else 4, seed=4)
    g = torch.Generator().manual_seed(6)
    x, b = torch.randn(3, 5, 96, generator=g), torch.randn(70, generator=g)
    y = cpu.few_rows_quantized(x, scheme, stored, scale, low, b)
    if cpu.library() is None:
        assert y is None
    else:
        assert y is not None and y.shape == (3, 5, 70)
        close(y, x @ w.t() + b)
        close(cpu.few_rows_quantized(x.transpose(0, 1), scheme, stored, scale, low),
              x.transpose(0, 1) @ w.t())                                   # x not contiguous
    many = torch.randn(cpu.QUANT_ROWS + 1, 96)
    assert cpu.few_rows_quantized(many, scheme, stored, scale, low) is None
    assert cpu.few_rows_quantized(x.bfloat16(), scheme, stored, scale, low) is None
    assert cpu.few_rows_quantized(x, scheme, stored, scale.float(), low) is None
    wide = torch.zeros(70, stored.shape[1] * 2, dtype=torch.uint8)[:, ::2]    # strided codes
    assert cpu.few_rows_quantized(x, scheme, wide, scale, low) is None


@needs_cc
def test_one_openmp_runtime_shared_with_torch():
    """The library's libgomp.so.1 is the one torch loaded: one thread pool, not two."""
    assert cpu.library() is not None
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    paths = {line.split()[-1] for line in maps.read_text().splitlines()
             if line.rstrip().endswith("/libgomp.so.1")}
    assert len(paths) == 1, paths


@needs_cc
def test_no_threads_beyond_torchs():
    """The kernels run on the OpenMP threads torch already has: none are added."""
    tasks = Path("/proc/self/task")
    if not tasks.exists():
        pytest.skip("needs /proc/self/task")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        w, x = torch.randn(4096, 256), torch.randn(4, 256)
        torch.mm(torch.randn(256, 256), torch.randn(256, 256))          # torch's pool up
        before = len(list(tasks.iterdir()))
        for _ in range(3):
            cpu.linear_f32(x, w)
        assert len(list(tasks.iterdir())) == before
    finally:
        torch.set_num_threads(threads)
