"""The quantized tensor format (format 2): int8 and int4 in groups of 32 along the input
dimension, each group with a float16 scale and minimum, and the `quant.json` file of a
pre-quantized checkpoint.

For a weight W of shape (..., out, in), `in` a multiple of 32, a checkpoint holds, instead
of W:

    int8    W.qweight  uint8   (..., out, in)        codes 0..255
    int4    W.qweight  uint8   (..., out, in // 2)   two codes 0..15 per byte: low nibble
                                                     = column 2j, high nibble = column 2j+1
    both    W.scale    float16 (..., out, in // 32)  w = code * scale + min, per group of 32
            W.min      float16 (..., out, in // 32)

So int8 takes 1.125 bytes a weight and int4 0.625. edgeserve's quantizer spans each group's
[min, max] with 255 (int8) or 15 (int4) steps: scale and minimum are computed in float32,
rounded to float16 (the minimum down, the scale up, so that the stored grid still covers
the group), and the codes are then the nearest ones for the stored values: every weight is
within half a step of its value.

GGUF maps onto it exactly: Q8_0 as int8 (scale = d, min = -128 d, code = q + 128), Q4_0 as
int4 (min = -8 d) and Q4_1 (scale = d, min = m). Format 1 (int8 per output channel, float32
scales) is no longer read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelFormatError

SCHEMES = ("int8", "int4")
GROUP = 32                       # group size along the input dimension, both schemes
LEVELS = {"int8": 255, "int4": 15}   # steps between a group's minimum and maximum
QUANT_FILE = "quant.json"
FORMAT = 2
PARTS = {"int8": ("qweight", "scale", "min"), "int4": ("qweight", "scale", "min")}
F16_MAX = float(torch.finfo(torch.float16).max)


def _known(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def parts(name: str, scheme: str) -> dict[str, str]:
    """Component -> checkpoint tensor name of weight `name` stored in `scheme`."""
    return {p: f"{name}.{p}" for p in PARTS[scheme]}


def shapes(scheme: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each component of a weight of `shape` (..., out, in)."""
    _known(scheme)
    *lead, inner = shape
    if inner % GROUP:
        raise ValueError(f"{scheme} needs the input dimension to be a multiple of {GROUP}, "
                         f"got {inner}")
    groups = (*lead, inner // GROUP)
    codes = (*lead, inner if scheme == "int8" else inner // 2)
    return {"qweight": (codes, torch.uint8),
            "scale": (groups, torch.float16), "min": (groups, torch.float16)}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (..., n) -> (..., n // 2): low nibble even columns, high odd."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n // 2) packed bytes -> (..., n) uint8 codes 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _to_f16(x: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 -> the float16 next to it, at or below it (down) or at or above it."""
    if bool((x.abs() > F16_MAX).any()):
        raise ValueError(f"values beyond float16's range (|x| up to {float(x.abs().max()):.4g})"
                         " cannot be quantized")
    h = x.to(torch.float16)
    off = h.float() > x if down else h.float() < x
    toward = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(off, torch.nextafter(h, toward), h)


def encode(g: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, levels: int) -> torch.Tensor:
    """The nearest codes 0..levels of groups g (..., G, 32) for the stored float16 scale and
    minimum (..., G); a zero scale (a constant group) gives code 0."""
    s, m = scale.float()[..., None], low.float()[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round((g.float() - m) / safe).clamp_(0, levels).to(torch.uint8)


def quantize_groups(w: torch.Tensor, levels: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (..., out, in) uint8, scale and minimum (..., out, in // 32) float16 spanning
    each group of 32 along the input dim with `levels` steps."""
    *lead, inner = w.shape
    g = w.float().reshape(*lead, inner // GROUP, GROUP)
    low = _to_f16(g.amin(dim=-1), down=True)
    # The step from the stored minimum, rounded up: low + levels * scale >= the maximum
    # (a scale under float16's smallest subnormal becomes that subnormal, never 0).
    span = g.amax(dim=-1) - low.float()
    scale = _to_f16(span / levels, down=False)
    codes = encode(g, scale, low, levels)
    return codes.reshape(*lead, inner), scale.contiguous(), low.contiguous()


def quantize(scheme: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float weight (..., out, in) -> its components in `scheme`."""
    shapes(scheme, tuple(w.shape))                       # checks the scheme and group size
    codes, scale, low = quantize_groups(w, LEVELS[scheme])
    q = codes if scheme == "int8" else pack_int4(codes)
    return {"qweight": q.contiguous(), "scale": scale, "min": low}


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    return quantize("int8", w)


def quantize_int4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    return quantize("int4", w)


def codes_of(scheme: str, qweight: torch.Tensor) -> torch.Tensor:
    """The uint8 codes (..., out, in) of stored qweight."""
    return qweight if scheme == "int8" else unpack_int4(qweight)


def dequantize(scheme: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the components stand for (reference path: tests, task blocks)."""
    _known(scheme)
    codes = codes_of(scheme, tensors["qweight"]).float()
    *lead, inner = codes.shape
    g = codes.reshape(*lead, inner // GROUP, GROUP)
    w = g * tensors["scale"].float()[..., None] + tensors["min"].float()[..., None]
    return w.reshape(*lead, inner)


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
        raise ModelFormatError(
            f"{path}: quantized format {fmt!r}, but this version of edgeserve reads format "
            f"{FORMAT} only (int8 and int4 in groups of 32 with float16 scales and minimums); "
            "quantize the model again from its float checkpoint")
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
