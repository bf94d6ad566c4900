"""A safetensors file written one source tensor at a time.

The library's writer takes every tensor at once; a quantized checkpoint is made from a
source read tensor by tensor, so the header (every shape and offset is known beforehand)
is written first and the values streamed after it, never holding the model in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.float64: "F64", torch.int8: "I8", torch.uint8: "U8"}
S = TypeVar("S")


def write_safetensors(path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...], S]],
                      produce: Callable[[S], dict[str, torch.Tensor]]) -> None:
    """tensors: (name, dtype, shape, source) in file order; produce(source) returns the
    values of the tensors made from that source (consecutive entries share a source)."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        last: object = None
        values: dict[str, torch.Tensor] = {}
        for name, dtype, shape, source in tensors:
            if source is not last:
                values, last = produce(source), source
            t = values[name]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, "
                                 f"declared {dtype} {tuple(shape)}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
