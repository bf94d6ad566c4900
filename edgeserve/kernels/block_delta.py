"""CUDA kernel for task blocks: out[t, r-block] += x[t, c-block] @ (V - W[r, c])^T.

One thread block per (task block, group of tokens): the block's difference V - W[r, c] is
formed once in shared memory, then each thread computes one output row for the group's
tokens and adds it with atomicAdd into a float32 buffer (blocks of one task may share an
output row block). The torch twin is blocks.delta.block_delta; the first call on each
device and dtype is checked against it, and a kernel that disagrees (or fails to build)
is switched off with an error logged, so a wrong kernel can cost speed but never results.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("edgeserve.kernels")
TOKENS = 16                     # tokens per thread block
_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
extern "C" __global__ void block_delta(
        const T* __restrict__ x, const long long n_tok, const long long n_in,
        const T* __restrict__ w, const long long n_out,
        const unsigned char* __restrict__ slab, const long long step,
        const long long* __restrict__ addr, const long long* __restrict__ rows,
        const long long* __restrict__ cols, const long long br, const long long bc,
        float* __restrict__ out) {
    extern __shared__ float d[];                        // (br, bc): V - W[r, c]
    const long long b = blockIdx.x;
    const int j = threadIdx.x;
    const long long r0 = rows[b] * br, c0 = cols[b] * bc;
    const T* v = reinterpret_cast<const T*>(slab + addr[b] * step);
    for (long long i = j; i < br * bc; i += blockDim.x) {
        const long long rr = i / bc, cc = i % bc;
        d[i] = ld(v[i]) - ld(w[(r0 + rr) * n_in + c0 + cc]);
    }
    __syncthreads();
    const long long t_end = min((long long)(blockIdx.y + 1) * TOKENS, n_tok);
    for (long long row = j; row < br; row += blockDim.x) {
        for (long long t = (long long)blockIdx.y * TOKENS; t < t_end; ++t) {
            const T* xt = x + t * n_in + c0;
            float acc = 0.f;
            for (long long k = 0; k < bc; ++k) acc += ld(xt[k]) * d[row * bc + k];
            atomicAdd(out + t * n_out + r0 + row, acc);
        }
    }
}
"""
_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
_kernels: dict[torch.dtype, Any] = {}
_checked: dict[tuple[int, torch.dtype], bool] = {}     # (device, dtype) -> kernel agrees


def _kernel(dtype: torch.dtype) -> Any:
    if dtype not in _kernels:
        import cupy

        code = f"#define T {_TYPES[dtype]}\n#define TOKENS {TOKENS}\n" + _SOURCE
        _kernels[dtype] = cupy.RawKernel(code, "block_delta")
    return _kernels[dtype]


def _launch(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, slab: torch.Tensor, step: int,
            index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            block: tuple[int, int]) -> torch.Tensor:
    import cupy
    import numpy

    rows, cols, addr = (t.contiguous() for t in index)       # passed as raw pointers
    br, bc = block
    n_in, n_out = w.shape[1], w.shape[0]
    xs = x.reshape(-1, n_in).contiguous()
    out = torch.zeros(xs.shape[0], n_out, dtype=torch.float32, device=y.device)
    kernel = _kernel(x.dtype)
    grid = (int(addr.numel()), (xs.shape[0] + TOKENS - 1) // TOKENS)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(y.device).cuda_stream)
    # Every argument at its exact width: pointers as 64-bit, sizes as long long.
    ptr, size = numpy.uint64, numpy.int64
    args = (ptr(xs.data_ptr()), size(xs.shape[0]), size(n_in), ptr(w.data_ptr()), size(n_out),
            ptr(slab.data_ptr()), size(step), ptr(addr.data_ptr()), ptr(rows.data_ptr()),
            ptr(cols.data_ptr()), size(br), size(bc), ptr(out.data_ptr()))
    with cupy.cuda.Device(y.device.index or 0), stream:
        kernel(grid, (min(br, 128),), args, shared_mem=br * bc * 4)
    return y + out.view(*x.shape[:-1], n_out).to(y.dtype)


def block_delta_cuda(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, slab: torch.Tensor,
                     step: int, index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     block: tuple[int, int], reference: Any) -> torch.Tensor:
    """The kernel's result, or reference() where the kernel is off for this device/dtype."""
    key = (y.device.index or 0, x.dtype)
    if _checked.get(key) is False or x.dtype not in _TYPES or w.dtype != x.dtype \
            or not w.is_contiguous() or block[0] * block[1] * 4 > 48 << 10:
        return reference()
    try:
        fast = _launch(y, x, w, slab, step, index, block)
    except Exception:              # no CuPy, no compiler: the torch path is as correct
        log.exception("block-delta kernel unavailable on %s; using torch", y.device)
        _checked[key] = False
        return reference()
    if key not in _checked:
        slow = reference()
        tol = 1e-4 if x.dtype == torch.float32 else 2e-2
        scale = float(slow.abs().max()) or 1.0
        ok = float((fast.float() - slow.float()).abs().max()) <= tol * scale
        _checked[key] = ok
        if not ok:
            log.error("block-delta kernel disagrees with torch on %s %s; using torch",
                      y.device, x.dtype)
            return slow
    return fast
