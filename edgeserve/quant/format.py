"""The quantized tensor format: int8 per output channel, int4 in groups of 32 with a scale
and a minimum, and the `quant.json` file of a pre-quantized checkpoint.

For a weight W of shape (..., out, in) a checkpoint holds, instead of W:

    int8    W.qweight  int8    (..., out, in)        w = qweight * scale[..., None]
            W.scale    float32 (..., out)
    int4    W.qweight  uint8   (..., out, in // 2)   two codes 0..15 per byte: low nibble
                                                     = column 2j, high nibble = column 2j+1
            W.scale    float32 (..., out, in // 32)  w = code * scale + min, per group of 32
            W.min      float32 (..., out, in // 32)

GGUF's Q4_1 blocks map onto int4 exactly (scale = d, min = m), Q4_0 too (min = -8 d).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelFormatError

SCHEMES = ("int8", "int4")
GROUP = 32                       # int4 group size along the input dimension
QUANT_FILE = "quant.json"
FORMAT = 1
PARTS = {"int8": ("qweight", "scale"), "int4": ("qweight", "scale", "min")}


def parts(name: str, scheme: str) -> dict[str, str]:
    """Component -> checkpoint tensor name of weight `name` stored in `scheme`."""
    return {p: f"{name}.{p}" for p in PARTS[scheme]}


def shapes(scheme: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each component of a weight of `shape` (..., out, in)."""
    *lead, inner = shape
    if scheme == "int8":
        return {"qweight": ((*lead, inner), torch.int8), "scale": (tuple(lead), torch.float32)}
    if scheme == "int4":
        if inner % GROUP:
            raise ValueError(f"int4 needs the input dimension to be a multiple of {GROUP}, "
                             f"got {inner}")
        groups = (*lead, inner // GROUP)
        return {"qweight": ((*lead, inner // 2), torch.uint8),
                "scale": (groups, torch.float32), "min": (groups, torch.float32)}
    raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (..., n) -> (..., n // 2): low nibble even columns, high odd."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n // 2) packed bytes -> (..., n) uint8 codes 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric, one scale per output channel (the last dim is the input)."""
    w = w.float()
    scale = w.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q.contiguous(), "scale": scale.contiguous()}


def quantize_int4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Asymmetric groups of 32 along the input dim: codes 0..15 spanning [min, max]."""
    *lead, inner = w.shape
    shapes("int4", tuple(w.shape))                              # checks the group size
    g = w.float().reshape(*lead, inner // GROUP, GROUP)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = (high - low) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - low[..., None]) / safe[..., None]).clamp_(0, 15)
    packed = pack_int4(codes.to(torch.uint8).reshape(*lead, inner))
    return {"qweight": packed.contiguous(), "scale": scale.contiguous(), "min": low.contiguous()}


def quantize(scheme: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def dequantize(scheme: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the components stand for (reference path: tests, task blocks)."""
    if scheme == "int8":
        return tensors["qweight"].float() * tensors["scale"].float()[..., None]
    if scheme == "int4":
        codes = unpack_int4(tensors["qweight"]).float()
        *lead, inner = codes.shape
        g = codes.reshape(*lead, inner // GROUP, GROUP)
        w = g * tensors["scale"].float()[..., None] + tensors["min"].float()[..., None]
        return w.reshape(*lead, inner)
    raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


@dataclass(frozen=True)
class QuantInfo:
    """A checkpoint's `quant.json`: which weights are stored quantized, in which scheme."""

    scheme: str                              # "int8" | "int4" | "mixed"
    tensors: dict[str, str]                  # weight name -> scheme
    source: str = ""
    # Optional: content hash of each weight's source tensor (written by edgeserve's own
    # quantization cache), so units keep the keys of the source's bytes and scheme.
    hashes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        body: dict[str, object] = {"format": FORMAT, "scheme": self.scheme,
                                   "tensors": self.tensors, "source": self.source}
        if self.hashes:
            body["hashes"] = self.hashes
        return json.dumps(body, indent=1, sort_keys=True)


def read_quant(folder: Path) -> QuantInfo | None:
    """The folder's quant.json, None when it has none; ModelFormatError when malformed."""
    path = folder / QUANT_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        fmt, scheme, tensors = body["format"], body["scheme"], body["tensors"]
        source, hashes = str(body.get("source", "")), body.get("hashes", {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path}: not a valid quant.json ({e})") from e
    if fmt != FORMAT:
        raise ModelFormatError(f"{path}: format {fmt!r} is not {FORMAT}")
    if scheme not in (*SCHEMES, "mixed"):
        raise ModelFormatError(f"{path}: scheme {scheme!r} is not int8, int4 or mixed")
    if not isinstance(tensors, dict) or not isinstance(hashes, dict):
        raise ModelFormatError(f"{path}: 'tensors' and 'hashes' must be objects")
    for name, s in tensors.items():
        if s not in SCHEMES:
            raise ModelFormatError(f"{path}: tensor '{name}' has scheme {s!r}, "
                                   f"not one of {', '.join(SCHEMES)}")
    return QuantInfo(scheme, {str(k): str(v) for k, v in tensors.items()}, source,
                     {str(k): str(v) for k, v in hashes.items()})
