"""A decode step through every layer of a dense model in one call of decode.c.

A decode step on the CPU is some 400 small torch operations (norms, rotary embeddings,
the KV write and gather, attention, activations) around the matmuls, each costing more
in dispatch than in arithmetic. `FusedDecode` hands the whole stack of layers to the C
library instead: the model's weights are described once (pointers into the pool's views,
valid for as long as the views are: the model is rebuilt when the pool compacts), and
each step passes the batch's positions, page table, slots and the KV view.

It runs where it computes exactly what arch/dense.py does, up to float rounding: float32
on the CPU, float32 or int8 / int4 (matmul.c's layouts) weights, per-head q/k norms or
none, no clipping, one new token per sequence and no task blocks. `run` takes every layer
where each has a dense feed-forward; `attend` takes one layer's attention half for models
with feed-forwards of their own (MoE). Everywhere else they return False / None and the
caller takes the torch path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.kernels.cpu import matmul as cpu
from edgeserve.quant.linear import QWeight

if TYPE_CHECKING:
    from edgeserve.arch.dense import Layer

_L, _P, _D = ctypes.c_long, ctypes.c_void_p, ctypes.c_double
KINDS = {"int8": 8, "int4": 4}          # matmul.c's kinds; float32 is 0
# Rows (sequences) up to which the step is faster here than through torch (a 135M model's
# step on one thread, bench/decode_step.py): with float32 weights torch's matmuls catch up
# at some 160 rows; with quantized ones matmul.c stays ahead up to its own QUANT_ROWS.
FLOAT_ROWS = 128
# Attention multiply-adds (over all rows and heads) from which threads share a layer's
# attention: below, a parallel region's start and barrier (a stall when the other thread is
# switched out, on a shared CPU) cost more than they save.
PARALLEL_FROM = 1 << 20


class Linear(ctypes.Structure):
    _fields_ = [("kind", _L), ("w", _P), ("ldw", _L), ("scale", _P), ("min", _P), ("bias", _P),
                ("n", _L), ("k", _L)]


class LayerArgs(ctypes.Structure):
    _fields_ = [("norm_in", _P), ("norm_post", _P), ("q_norm", _P), ("k_norm", _P),
                ("qkv", Linear), ("o", Linear), ("gate_up", Linear), ("down", Linear),
                ("window", _L), ("layer", _L)]


class Dims(ctypes.Structure):
    _fields_ = [("hidden", _L), ("heads", _L), ("kv_heads", _L), ("head_dim", _L),
                ("inter", _L), ("eps", _D), ("inv_freq", _P)]


class Step(ctypes.Structure):
    _fields_ = [("rows", _L), ("positions", _P), ("kv_lens", _P), ("page_table", _P),
                ("pt_stride", _L), ("slot_page", _P), ("slot_offset", _P), ("kv", _P),
                ("s_page", _L), ("s_layer", _L), ("s_token", _L), ("s_kv", _L), ("s_head", _L),
                ("page_tokens", _L), ("threads", _L), ("parallel_from", _L)]


class Unsupported(Exception):
    """The model has something the kernel does not compute."""


def _vector(t: torch.Tensor | None, n: int, optional: bool = False) -> int | None:
    """The address of a float32 (n,) CPU vector with unit stride."""
    if t is None:
        if optional:
            return None
        raise Unsupported("a missing vector")
    if t.dtype != torch.float32 or t.shape != (n,) or t.stride(0) != 1 or not t.is_cpu:
        raise Unsupported(f"a {t.dtype} {tuple(t.shape)} vector")
    return t.data_ptr()


def _linear(w: torch.Tensor | QWeight, bias: torch.Tensor | None, n: int, k: int) -> Linear:
    """A linear's description for the kernel: (n, k) float32 rows of unit column stride, or
    an int8 / int4 weight with contiguous parts."""
    b = _vector(bias, n, optional=True)
    if isinstance(w, QWeight):
        if w.scheme not in KINDS or w.shape != (n, k) or not w.qweight.is_cpu:
            raise Unsupported(f"a {w.scheme} weight {w.shape}")
        try:
            cpu.check_groups(w.qweight, w.scale, w.min, k)
        except ValueError as e:
            raise Unsupported(f"a {w.scheme} weight: {e}") from e
        return Linear(KINDS[w.scheme], w.qweight.data_ptr(), k, w.scale.data_ptr(),
                      w.min.data_ptr(), b, n, k)
    if (w.dtype != torch.float32 or tuple(w.shape) != (n, k) or w.stride(1) != 1
            or not w.is_cpu):
        raise Unsupported(f"a {w.dtype} weight {tuple(w.shape)}")
    return Linear(0, w.data_ptr(), w.stride(0), None, None, b, n, k)


def _layer(spec: ModelSpec, layer: Layer, n: int) -> tuple[LayerArgs, bool]:
    """The layer for the kernel, and whether its feed-forward is there too (a dense MLP of
    the kernel's kinds; without it, as in MoE layers, only its attention half runs here)."""
    d, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    a, mlp = layer.attn, layer.mlp
    if (a.q_norm is None) != (a.k_norm is None):
        raise Unsupported("a q norm without a k norm")
    try:
        ff = (_linear(mlp.gate_up, mlp.gate_up_bias, 2 * inter, d),
              _linear(mlp.down, mlp.down_bias, d, inter)) if mlp is not None else None
    except Unsupported:
        ff = None
    width = spec.q_size + 2 * spec.kv_size
    return LayerArgs(_vector(layer.norm_in, d), _vector(layer.norm_post, d),
                     _vector(a.q_norm, hd, True), _vector(a.k_norm, hd, True),
                     _linear(a.qkv, a.qkv_bias, width, d), _linear(a.o, a.o_bias, d, spec.q_size),
                     *(ff or (Linear(), Linear())), spec.sliding_windows[n] or 0, n), ff is not None


class Described(NamedTuple):
    dims: Dims
    layers: ctypes.Array[LayerArgs]
    norm: int                       # the final norm's address
    head: Linear
    whole: bool                     # every layer's feed-forward is the kernel's too


class FusedDecode:
    """A dense model's layers, final norm and head for decode.c, described on first use."""

    def __init__(self, spec: ModelSpec, layers: Sequence[Layer], inv_freq: torch.Tensor,
                 dtype: torch.dtype, norm: torch.Tensor, head: torch.Tensor | QWeight) -> None:
        self.spec, self.layers, self.inv_freq = spec, layers, inv_freq.float().contiguous()
        self.dtype, self.norm, self.head = dtype, norm, head
        self._args: Described | None = None
        self.max_rows = 0
        self._tried = False
        self.why = ""               # why the model is unsupported, once tried

    def _describe(self) -> Described | None:
        spec = self.spec
        try:
            if self.dtype != torch.float32 or not self.inv_freq.is_cpu:
                raise Unsupported(f"compute dtype {self.dtype}")
            if spec.clip_qkv is not None or not spec.qk_norm_per_head:
                raise Unsupported("clipped or whole-projection normed q, k, v")
            if spec.num_heads % spec.num_kv_heads or spec.head_dim % 2:
                raise Unsupported("heads not in whole groups")
            described = [_layer(spec, layer, n) for n, layer in enumerate(self.layers)]
            layers = (LayerArgs * len(described))(*(args for args, _ in described))
            norm = _vector(self.norm, spec.hidden_size)
            head = _linear(self.head, None, spec.vocab_size, spec.hidden_size)
        except Unsupported as e:
            self.why = str(e)
            return None
        linears = [getattr(layer, part) for layer in layers
                   for part in ("qkv", "o", "gate_up", "down") if getattr(layer, part).w]
        self.max_rows = FLOAT_ROWS if any(w.kind == 0 for w in linears) else cpu.QUANT_ROWS
        dims = Dims(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                    spec.intermediate_size, spec.rms_norm_eps, self.inv_freq.data_ptr())
        assert norm is not None
        whole = all(ff for _, ff in described)
        self.why = "" if whole else "a feed-forward of its own (the attention halves run here)"
        return Described(dims, layers, norm, head, whole)

    def _ready(self, batch: StepBatch, x: torch.Tensor) -> tuple[cpu.Library, Described] | None:
        """The library and the model's description where a step of batch over x may use
        them (the library is not even built for other devices' steps)."""
        cheap = batch.width == 1 and not batch.padded and batch.delta is None and x.is_cpu \
            and batch.slot_page.numel() == batch.size      # one new token in every row
        lib = cpu.library() if cheap else None
        if lib is None:
            return None
        if not self._tried:
            self._args, self._tried = self._describe(), True
        if self._args is None or batch.size > self.max_rows:
            return None
        return lib, self._args

    def run(self, batch: StepBatch, kv: torch.Tensor, x: torch.Tensor) -> bool:
        """x (B, 1, D) through every layer in place, the new keys and values written into
        kv (pages, L, P, 2, KVH, hd); False (nothing done) where the kernel does not apply."""
        ready = self._ready(batch, x)
        if ready is None or not ready[1].whole or not _applies(batch, kv, x):
            return False
        lib, args = ready
        if _function(lib, "es_decode_layers")(ctypes.byref(args.dims), args.layers,
                                              len(args.layers), ctypes.byref(_step(batch, kv)),
                                              x.data_ptr()) != 0:
            raise MemoryError("fused decode: no memory for the step's buffers")
        return True

    def attend(self, n: int, batch: StepBatch, kv: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor | None:
        """Layer n's attention half for a model with feed-forwards of its own (MoE): x
        (B, 1, D) in place, and the post-attention norm of x returned; None (nothing done)
        where the kernel does not apply."""
        ready = self._ready(batch, x)
        if ready is None or not _applies(batch, kv, x):
            return None
        lib, args = ready
        h = torch.empty_like(x)
        if _function(lib, "es_decode_attention")(ctypes.byref(args.dims),
                                                 ctypes.byref(args.layers[n]),
                                                 ctypes.byref(_step(batch, kv)), x.data_ptr(),
                                                 h.data_ptr()) != 0:
            raise MemoryError("fused decode: no memory for the step's buffers")
        return h

    def logits(self, batch: StepBatch, x: torch.Tensor) -> torch.Tensor | None:
        """The logits (B, V) of x (B, D), the last layer's output: the final norm and the
        head in one call; None where the kernel does not apply."""
        ready = self._ready(batch, x)
        if ready is None or x.dtype != torch.float32 or not x.is_contiguous() or not x.is_cpu:
            return None
        lib, args = ready
        y = torch.empty(batch.size, self.spec.vocab_size, dtype=torch.float32)
        if _function(lib, "es_decode_head")(ctypes.byref(args.dims), args.norm,
                                            ctypes.byref(args.head), x.data_ptr(), batch.size,
                                            y.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("fused decode: no memory for the normed rows")
        return y


def _step(batch: StepBatch, kv: torch.Tensor) -> Step:
    s = kv.stride()
    return Step(batch.size, batch.positions.data_ptr(), batch.kv_lens.data_ptr(),
                batch.page_table.data_ptr(), batch.page_table.stride(0),
                batch.slot_page.data_ptr(), batch.slot_offset.data_ptr(), kv.data_ptr(),
                s[0], s[1], s[2], s[3], s[4], kv.shape[2], torch.get_num_threads(),
                PARALLEL_FROM)


def _applies(batch: StepBatch, kv: torch.Tensor, x: torch.Tensor) -> bool:
    """This step's tensors are as the kernel reads them."""
    ints = (batch.positions, batch.kv_lens, batch.page_table, batch.slot_page,
            batch.slot_offset)
    return (x.dtype == kv.dtype == torch.float32 and x.is_contiguous() and kv.stride(-1) == 1
            and x.is_cpu and kv.is_cpu
            and all(t.dtype == torch.int64 and t.is_contiguous() for t in ints))


_ARGTYPES = {"es_decode_layers": [ctypes.POINTER(Dims), ctypes.POINTER(LayerArgs), _L,
                                  ctypes.POINTER(Step), _P],
             "es_decode_attention": [ctypes.POINTER(Dims), ctypes.POINTER(LayerArgs),
                                     ctypes.POINTER(Step), _P, _P],
             "es_decode_head": [ctypes.POINTER(Dims), _P, ctypes.POINTER(Linear), _P, _L, _P,
                                _L]}
_bound: dict[str, tuple[cpu.Library, Any]] = {}     # name: the library, its typed function


def _function(lib: cpu.Library, name: str) -> Any:
    if name not in _bound or _bound[name][0] is not lib:
        fn = getattr(lib.cdll, name)
        fn.argtypes = _ARGTYPES[name]
        fn.restype = ctypes.c_int
        _bound[name] = (lib, fn)
    return _bound[name][1]
