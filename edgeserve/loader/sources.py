"""What a checkpoint folder holds: its tensors (headers read, sizes checked), the content
key of every unit it makes, and its validated spec."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeserve.arch import weight_plan
from edgeserve.arch.plan import WeightUnit
from edgeserve.arch.spec import ModelFormatError, ModelSpec, load_spec
from edgeserve.checkpoint import TensorInfo, read_header
from edgeserve.quant.format import parts, read_quant
from edgeserve.quant.units import check_parts, part_hash, unit_schemes

if TYPE_CHECKING:
    from edgeserve.loader import LoadContext


def scan_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (single file or sharded), checked against file sizes."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {model_dir / str(f) for f in weight_map.values()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelFormatError(f"{index}: no valid 'weight_map' ({e})") from e
        for path in files:
            if not path.is_file():
                raise ModelFormatError(f"{index}: shard {path.name} not found")
    elif single.is_file():
        files = {single}
    else:
        raise ModelFormatError(f"{model_dir}: no model.safetensors nor "
                               "model.safetensors.index.json")
    return {t.name: t for path in sorted(files) for t in read_header(path)}


def unit_keys(model_dir: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
              tensors: dict[str, TensorInfo], compute: bool = True,
              known: dict[Path, dict[str, str]] | None = None,
              only: set[str] | None = None) -> dict[str, str]:
    """Content key of every unit the model is made of; with compute=False, {} unless every
    file's tensor hashes are cached or known (a file never seen is hashed as a load reads
    it). With `only` (unit names), the keys of those units alone, from their own tensors
    where a file was never hashed (nothing is cached then). A quantized unit's key is made
    of its scheme and its source tensors' hashes (from quant.json when it has them, else
    the stored components'), a float unit's of the compute dtype and its tensors' hashes."""
    plan = weight_plan(spec)
    if only is not None:
        plan = {name: unit for name, unit in plan.items() if name in only}
    info = read_quant(model_dir)
    schemes = unit_schemes(model_dir, plan, info)
    hashes: dict[str, str] = {}
    recorded = info.hashes if info is not None else {}
    if any(p not in recorded for u in plan.values() for p in u.parts):
        wanted = _tensors_of(plan, schemes) if only is not None else set()
        for path in {t.path for t in tensors.values()}:
            cached = (known or {}).get(path)
            if cached is None and only is not None:
                cached = ctx.hashes.some(path, {t.name for t in tensors.values()
                                                if t.path == path and t.name in wanted})
            elif cached is None:
                cached = ctx.hashes.get(path) if compute else ctx.hashes.cached(path)
            if cached is None:
                return {}
            hashes |= cached
    keys = {}
    for name, unit in plan.items():
        scheme = schemes.get(name)
        h = hashlib.blake2b(f"{scheme or ctx.dtype}|{unit.shape}|".encode(), digest_size=16)
        for part in unit.parts:
            h.update(part_hash(part, scheme, hashes, info).encode())
        if not ctx.share:
            h.update(f"|{owner}".encode())
        keys[name] = h.hexdigest()
    return keys


def _tensors_of(plan: dict[str, WeightUnit], schemes: dict[str, str]) -> set[str]:
    """The checkpoint tensors the units of plan are read from (a quantized part's own
    components)."""
    return {name for n, unit in plan.items() for part in unit.parts
            for name in (parts(part, schemes[n]).values() if n in schemes else (part,))}


def _check(model_dir: Path, spec: ModelSpec, tensors: dict[str, TensorInfo],
           schemes: dict[str, str]) -> None:
    for name, unit in weight_plan(spec).items():
        if name in schemes:
            check_parts(model_dir, unit, schemes[name], tensors)
            continue
        for part, _, rows in unit.slices():
            t = tensors.get(part)
            if t is None:
                raise ModelFormatError(f"{model_dir}: checkpoint lacks tensor '{part}'")
            if t.shape != (rows, *unit.shape[1:]):
                raise ModelFormatError(f"{t.path}: tensor '{part}' has shape {t.shape}, "
                                       f"config.json implies {(rows, *unit.shape[1:])}")


@dataclass(frozen=True)
class Sources:
    """Where a model's units come from: its checkpoint tensors and their content keys."""

    tensors: dict[str, TensorInfo]
    keys: dict[str, str]             # unit name -> content key ({} while not known)
    schemes: dict[str, str] = field(default_factory=dict)   # quantized unit -> scheme

    @classmethod
    def scan(cls, model_dir: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
             compute: bool = True) -> Sources:
        """compute=False: no file is hashed here; keys stay {} if one was never seen."""
        tensors = scan_checkpoint(model_dir)
        schemes = unit_schemes(model_dir, weight_plan(spec), read_quant(model_dir))
        _check(model_dir, spec, tensors, schemes)
        return cls(tensors, unit_keys(model_dir, spec, ctx, owner, tensors, compute), schemes)

    @property
    def known(self) -> bool:
        return bool(self.keys)


def read_spec(model_dir: Path) -> ModelSpec:
    spec = load_spec(model_dir)
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{generation}: not valid JSON ({e})") from e
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            spec = replace(spec, eos_token_ids=ids)
    return spec
