"""Quantized checkpoints kept in the store: `models/.edgeserve/quant/<name>-<digest>/<scheme>/`.

The first load of `NAME:int8` quantizes NAME's checkpoint one tensor at a time into a
pre-quantized folder (quant/format.py) and every later load reads that folder alone. The
folder records the source files' sizes and modification times and the quantized format
(remade when either changes: a folder of an older format is never served) and each
weight's source content hash, so that quantized units are keyed by the source
bytes and the scheme: a fine-tune's units equal to its base's are shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from edgeserve.arch import weight_plan
from edgeserve.arch.plan import EMBED, HEAD, WeightUnit
from edgeserve.arch.spec import ModelFormatError, ModelSpec, load_spec
from edgeserve.checkpoint import HashCache, TensorInfo, read_tensor
from edgeserve.loader import scan_checkpoint
from edgeserve.quant.format import (
    FORMAT,
    GROUP,
    QUANT_FILE,
    SCHEMES,
    QuantInfo,
    parts,
    quantize,
    read_quant,
    shapes,
)
from edgeserve.quant.writer import write_safetensors

STAMP_FILE = "source.json"
# Under int4, the token embeddings and the head stay int8, as llama.cpp's 4-bit types keep
# them at 6 or 8 bits: every logit goes through the head (on SmolLM2-135M, whose head is its
# embeddings, int4 there costs 18 points of top-1 agreement, for 7% more bytes).
INT8_UNDER_INT4 = (EMBED, HEAD)
COPIED = ("config.json", "generation_config.json")


def cache_root(store: Path) -> Path:
    return store / ".edgeserve" / "quant"


def cache_dir(store: Path, model_dir: Path, scheme: str) -> Path:
    digest = hashlib.blake2b(str(model_dir.resolve()).encode(), digest_size=6).hexdigest()
    return cache_root(store) / f"{model_dir.name}-{digest}" / scheme


def cached_schemes(store: Path, model_dir: Path) -> dict[str, Path]:
    """The schemes of model_dir already quantized in the store (stale ones included)."""
    out = {}
    for scheme in SCHEMES:
        folder = cache_dir(store, model_dir, scheme)
        if (folder / QUANT_FILE).is_file():
            out[scheme] = folder
    return out


def quantizable(name: str, unit: WeightUnit) -> bool:
    """Linear weights and embeddings whose input dimension holds whole groups of 32; not
    norms, biases, nor routers (whose small errors would change which experts run)."""
    return len(unit.shape) >= 2 and unit.shape[-1] % GROUP == 0 and \
        not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))


def _stamp(model_dir: Path) -> dict[str, object]:
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.index.json"))
    return {"format": FORMAT,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


class QuantCache:
    """Quantized folders of the store's models, made on first use."""

    def __init__(self, store: Path, hashes: HashCache) -> None:
        self.store, self.hashes = store, hashes
        self.made = 0                # folders quantized by this process (tests read it)

    def folder(self, model_dir: Path, scheme: str, asked: bool = True) -> tuple[Path, float]:
        """The folder to load model_dir's weights from in `scheme`, and the seconds spent
        quantizing it now (0.0 when it was in the store already). A checkpoint stored
        quantized is served as it is: asked for another scheme by a tag (asked), it is an
        error; by the server's default, it is not."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r} "
                             f"(known: {', '.join(SCHEMES)})")
        own = read_quant(model_dir)
        if own is not None:              # stored quantized already: served as it is
            if asked and set(own.tensors.values()) != {scheme}:
                raise ModelFormatError(f"{model_dir}: stored as {own.scheme}; "
                                       f"it has no {scheme} variant")
            return model_dir, 0.0
        dest = cache_dir(self.store, model_dir, scheme)
        stamp = _stamp(model_dir)
        try:
            if json.loads((dest / STAMP_FILE).read_text()) == stamp and \
                    (dest / QUANT_FILE).is_file():
                return dest, 0.0
        except (OSError, json.JSONDecodeError):
            pass
        start = time.perf_counter()
        self._make(model_dir, load_spec(model_dir), scheme, dest, stamp)
        self.made += 1
        return dest, time.perf_counter() - start

    def _make(self, model_dir: Path, spec: ModelSpec, scheme: str, dest: Path,
              stamp: dict[str, object]) -> None:
        tensors = scan_checkpoint(model_dir)
        hashes: dict[str, str] = {}
        for path in {t.path for t in tensors.values()}:
            hashes |= self.hashes.get(path)
        chosen: dict[str, str] = {}
        for name, unit in weight_plan(spec).items():
            if quantizable(name, unit):
                s = "int8" if name in INT8_UNDER_INT4 else scheme
                chosen |= dict.fromkeys(unit.parts, s)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ordered = sorted(tensors.values(), key=lambda t: (str(t.path), t.start))
        write_safetensors(tmp / "model.safetensors",
                          _outputs(ordered, chosen), lambda t: _convert(t, chosen))
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        kinds = set(chosen.values())
        info = QuantInfo(kinds.pop() if len(kinds) == 1 else "mixed", chosen,
                         f"{model_dir.name} quantized by edgeserve",
                         {t.name: hashes[t.name] for t in ordered})
        (tmp / QUANT_FILE).write_text(info.to_json())
        (tmp / STAMP_FILE).write_text(json.dumps(stamp))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)


def _outputs(ordered: list[TensorInfo], chosen: dict[str, str]
             ) -> list[tuple[str, torch.dtype, tuple[int, ...], TensorInfo]]:
    """(name, dtype, shape, source) of every tensor the quantized file holds."""
    out = []
    for t in ordered:
        scheme = chosen.get(t.name)
        if scheme is None:
            out.append((t.name, t.dtype, t.shape, t))
            continue
        specs = shapes(scheme, t.shape)
        for comp, name in parts(t.name, scheme).items():
            shape, dtype = specs[comp]
            out.append((name, dtype, shape, t))
    return out


def _convert(t: TensorInfo, chosen: dict[str, str]) -> dict[str, torch.Tensor]:
    """Output name -> values for one source tensor."""
    scheme = chosen.get(t.name)
    if scheme is None:
        return {t.name: read_tensor(t)}
    return {f"{t.name}.{k}": v for k, v in quantize(scheme, read_tensor(t)).items()}
