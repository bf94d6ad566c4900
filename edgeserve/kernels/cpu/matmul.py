"""Matmuls with few activation rows on the CPU (decode), over float32, int8 and int4
weights: the C kernels of matmul.c, built on first use (build.py), behind typed wrappers
that check shapes. Without the library (no compiler, a failed build, or
EDGESERVE_CPU_KERNELS=off) every function gives torch's result instead.

Quantized layouts, groups of 32 columns, w = code * scale + min:
    int8  codes uint8 (N, K),            scale, min float16 (N, K / 32)
    int4  packed uint8 (N, K / 2): low nibble column 2j, high nibble column 2j + 1;
          scale, min float16 (N, K / 32)
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgeserve.config import kernel_config
from edgeserve.kernels.cpu import build
from edgeserve.quant.format import GROUP, dequantize

log = logging.getLogger("edgeserve.kernels")
# float32 weights: the activation rows for which the kernel beats torch's matmul on the CPU
# (bench/kernels.py, bench/RESULTS.md: 1.3x at 64 rows, even at 128). With one row both
# stream the weight at the memory's speed, and torch's matrix-vector product was as fast.
MIN_ROWS, ROWS = 2, 64
# Quantized weights: rows up to which the kernel beats quant/linear.py's torch path (which
# dequantizes slices and multiplies them with torch's matmul), measured likewise: at 512
# rows int8 even, int4 1.2x.
QUANT_ROWS = 512
SLICE = 4096                    # weight rows dequantized at once by the torch fallback

_L, _I, _P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p


class Library:
    """The built library's functions, typed."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.cdll = lib                 # the other kernels' functions (decode.py)
        self.f32 = lib.es_matmul_f32
        self.f32.argtypes = [_P, _L, _P, _L, _P, _P, _L, _L, _L, _L, _I]
        self.f32.restype = None
        self.q8 = lib.es_matmul_q8
        self.q8.argtypes = [_P, _L, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I]
        self.q8.restype = None
        self.q4 = lib.es_matmul_q4
        self.q4.argtypes = self.q8.argtypes
        self.q4.restype = _I
        self.vector_width = int(lib.es_vector_width())
        # the bandwidth probe; None in a build of an older source (bench/kernels.py --against)
        self.stream_sum = getattr(lib, "es_stream_sum", None)
        if self.stream_sum is not None:
            self.stream_sum.argtypes = [_P, _L, _I]
            self.stream_sum.restype = ctypes.c_double


_library: Library | None = None
_tried = False
_lock = threading.Lock()             # one build per process, whichever thread asks first


def library() -> Library | None:
    """The library, built and loaded on first use; None where it cannot be (logged once)."""
    global _library, _tried
    with _lock:
        if not _tried:
            cfg = kernel_config()
            if cfg.enabled:
                try:
                    path, flags = build.first_library(cfg.cc, cfg.cache)
                    _library = Library(str(path))
                    if flags != build.FLAGS:
                        log.warning("CPU kernels built with %s only (the native build "
                                    "failed): slower than they could be", " ".join(flags))
                except (build.BuildError, OSError) as e:
                    log.warning("CPU matmul kernels unavailable, using torch's matmuls: %s", e)
            _tried = True
    return _library


def reset() -> None:
    """Forget the library: the next use reads the settings and loads (or builds) anew."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False


def read_bandwidth(nbytes: int, threads: int, reps: int = 5,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """The machine's read bandwidth in bytes/s: the best of reps sums of a float32 buffer
    of nbytes (larger than the caches, for memory's speed) over threads threads, timed by
    clock (time.thread_time with one thread leaves out other processes' turns)."""
    lib = library()
    if lib is None or lib.stream_sum is None:
        raise RuntimeError("the CPU kernels are not available")
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(reps + 1):                   # the first touches the pages
        t = clock()
        lib.stream_sum(buf.data_ptr(), buf.numel(), threads)
        best = min(best, clock() - t)
    return buf.numel() * 4 / best


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as (M, K) float32 rows with unit column stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _bias(b: torch.Tensor | None, n: int) -> tuple[int | None, torch.Tensor | None]:
    """The bias's address for the kernel, or (where it is not float32 (n,) with unit
    stride) the bias to add afterwards."""
    if b is None:
        return None, None
    if b.shape == (n,) and b.dtype == torch.float32 and b.stride(0) == 1:
        return b.data_ptr(), None
    return None, b


def few_rows_f32(x: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ w.T + b through the kernel where it beats torch's matmul (float32 on the CPU,
    MIN_ROWS to ROWS rows, x contiguous, w with unit column stride); None elsewhere. The
    decode hook: it is called for every linear, so it checks little and cheaply."""
    if (not x.is_cpu or x.dtype != torch.float32 or w.dtype != torch.float32
            or w.dim() != 2 or w.stride(1) != 1 or not w.is_cpu or not x.is_contiguous()):
        return None
    lib = _library if _tried else library()
    if lib is None:
        return None
    n, k = w.shape
    m = x.numel() // k if x.shape[-1] == k else 0
    if not MIN_ROWS <= m <= ROWS:
        return None
    y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    bias, rest = _bias(b, n)
    lib.f32(x.data_ptr(), k, w.data_ptr(), w.stride(0), bias, y.data_ptr(), n, m, n, k,
            torch.get_num_threads())
    return y if rest is None else y + rest


def linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + b (N,) -> (..., N), float32, any number of rows. w may have
    a row stride."""
    y = few_rows_f32(x, w, b)
    if y is not None:
        return y
    lib = library()
    n, k = w.shape
    if (lib is None or x.dtype != torch.float32 or w.dtype != torch.float32 or w.stride(1) != 1
            or x.device.type != "cpu" or w.device.type != "cpu" or x.shape[-1] != k
            or x.numel() == 0):
        return F.linear(x, w, b)
    x2 = _rows(x)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    bias, rest = _bias(b, n)
    lib.f32(x2.data_ptr(), x2.stride(0), w.data_ptr(), w.stride(0), bias, y.data_ptr(), n, m, n,
            k, torch.get_num_threads())
    y = y.view(*x.shape[:-1], n)
    return y if rest is None else y + rest


def check_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                 k: int) -> None:
    """ValueError unless the parts are as matmul.c reads them (see the layouts above)."""
    n = codes.shape[0]
    if k % GROUP:
        raise ValueError(f"quantized weights need K a multiple of {GROUP}, got {k}")
    for name, t in (("scale", scale), ("min", minimum)):
        if t.shape != (n, k // GROUP) or t.dtype != torch.float16 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float16 ({n}, {k // GROUP}), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(f"codes must be contiguous uint8, got {codes.dtype}")


def _sliced(x2: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            scheme: str, b: torch.Tensor | None) -> torch.Tensor:
    """torch's result, SLICE weight rows dequantized at a time (quant/format.py)."""
    codes, scale, minimum = parts
    x2 = x2.float()
    out = [x2 @ dequantize(scheme, {"qweight": codes[i:i + SLICE], "scale": scale[i:i + SLICE],
                                    "min": minimum[i:i + SLICE]}).t()
           for i in range(0, codes.shape[0], SLICE)]
    y = torch.cat(out, dim=1)
    return y if b is None else y + b


def _run(lib: Library, x2: torch.Tensor, m: int, parts: tuple[torch.Tensor, ...],
         b: torch.Tensor | None, bits: int, lead: tuple[int, ...]) -> torch.Tensor:
    """The kernel over the m rows of x2 (..., K), unit column stride, rows at x2.stride(-2)
    (or contiguous) -> (*lead, N)."""
    codes, scale, minimum = parts
    k, n = x2.shape[-1], codes.shape[0]
    y = torch.empty((*lead, n), dtype=torch.float32)
    bias, rest = _bias(b, n)
    args = (x2.data_ptr(), k if x2.dim() != 2 else x2.stride(0), codes.data_ptr(),
            scale.data_ptr(), minimum.data_ptr(), bias, y.data_ptr(), n, m, n, k,
            torch.get_num_threads())
    if bits == 8:
        lib.q8(*args)
    elif lib.q4(*args) != 0:
        raise MemoryError("int4 matmul: no memory for the reordered activations")
    return y if rest is None else y + rest


def few_rows_quantized(x: torch.Tensor, scheme: str, codes: torch.Tensor, scale: torch.Tensor,
                       minimum: torch.Tensor, b: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
    """x @ w.T + b over an int8 or int4 weight (the layouts above) through the kernel: float32
    on the CPU, up to QUANT_ROWS rows, contiguous parts; None elsewhere (the caller's torch
    path). The hook of quant/linear.py, called for every quantized linear."""
    if (not x.is_cpu or x.dtype != torch.float32 or codes.dim() != 2
            or not codes.is_cpu or scale.dtype != torch.float16):
        return None
    lib = _library if _tried else library()
    if lib is None:
        return None
    k = codes.shape[1] * (2 if scheme == "int4" else 1)
    m = x.numel() // k if x.shape[-1] == k and k % GROUP == 0 else 0
    if not (0 < m <= QUANT_ROWS and codes.is_contiguous() and scale.is_contiguous()
            and minimum.is_contiguous() and scheme in ("int8", "int4")):
        return None
    x2 = x if x.is_contiguous() else _rows(x)
    return _run(lib, x2, m, (codes, scale, minimum), b, 8 if scheme == "int8" else 4,
                x.shape[:-1])


def _quantized(x: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               b: torch.Tensor | None, bits: int) -> torch.Tensor:
    codes, scale, minimum = parts
    y = few_rows_quantized(x, "int8" if bits == 8 else "int4", codes, scale, minimum, b)
    if y is not None:
        return y
    k = codes.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {k}")
    check_groups(codes, scale, minimum, k)
    n, x2 = codes.shape[0], _rows(x)
    lib = library()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu"
            or codes.device.type != "cpu" or x2.shape[0] == 0):
        scheme = "int4" if bits == 4 else "int8"
        return _sliced(x2, parts, scheme, b).to(x.dtype).view(*x.shape[:-1], n)
    return _run(lib, x2, x2.shape[0], parts, b, bits, x.shape[:-1])


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                minimum: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w.T + b for w = codes * scale + min (int8 layout above) -> (..., N)."""
    return _quantized(x, (codes, scale, minimum), b, 8)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                minimum: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w.T + b for w = code * scale + min (int4 layout above) -> (..., N)."""
    return _quantized(x, (packed, scale, minimum), b, 4)
