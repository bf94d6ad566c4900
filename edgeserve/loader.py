"""A Hugging Face model folder becomes weight units in a pool.

Tensors are read one at a time from the safetensors files (memory-mapped by the
safetensors library), converted to the compute dtype and copied straight into their
unit: the checkpoint is never held whole in Python memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgeserve.arch import dense
from edgeserve.arch.spec import ModelFormatError, ModelSpec, load_spec
from edgeserve.pool import BlockPool, Unit, UnitKind

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


@dataclass(slots=True)
class LoadReport:
    """Where a load's bytes came from, and how long it took."""

    model: str
    device: str
    seconds: float = 0.0
    bytes_total: int = 0
    bytes_from_device: int = 0
    bytes_from_host: int = 0
    bytes_from_disk: int = 0


@dataclass(slots=True)
class Checkpoint:
    """Which safetensors file holds each tensor of a model folder."""

    files: dict[str, Path] = field(default_factory=dict)   # tensor name -> file

    @classmethod
    def scan(cls, model_dir: Path) -> Checkpoint:
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelFormatError(f"{index}: no valid 'weight_map' ({e})") from e
            files = {name: model_dir / str(file) for name, file in weight_map.items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise ModelFormatError(f"{index}: shard {path.name} not found")
            return cls(files)
        if single.is_file():
            with _open(single) as f:
                return cls(dict.fromkeys(f.keys(), single))
        raise ModelFormatError(f"{model_dir}: no model.safetensors nor "
                               "model.safetensors.index.json")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from e


def load_weights(model_dir: Path, spec: ModelSpec, pool: BlockPool, dtype: torch.dtype,
                 owner: str, report: LoadReport,
                 progress: Callable[[int], None] | None = None) -> dict[str, Unit]:
    """Read every tensor the architecture needs into pinned weight units of `pool`.

    Units are taken first (a load that cannot fit fails before reading anything), then
    each file is read in order, every tensor copied into its rows of its unit. On any
    error the units taken so far are released before the error propagates.
    """
    plan = dense.weight_plan(spec)
    checkpoint = Checkpoint.scan(model_dir)
    # checkpoint tensor -> (unit name, first row, shape)
    slots: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for unit_name, unit in plan.items():
        for part, first, rows in unit.slices():
            slots[part] = (unit_name, first, (rows, *unit.shape[1:]))
    missing = [name for name in slots if name not in checkpoint.files]
    if missing:
        raise ModelFormatError(f"{model_dir}: checkpoint lacks tensor '{missing[0]}'"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    units: dict[str, Unit] = {}
    try:
        for name, planned in plan.items():
            units[name] = pool.allocate(UnitKind.WEIGHT,
                                        math.prod(planned.shape) * dtype.itemsize, owner=owner)
        views = {name: pool.view(units[name], dtype, plan[name].shape) for name in plan}
        by_file: dict[Path, list[str]] = {}
        for name in slots:
            by_file.setdefault(checkpoint.files[name], []).append(name)
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    unit_name, row, shape = slots[name]
                    tensor = _read_tensor(f, path, name, shape)
                    views[unit_name][row:row + shape[0]].copy_(tensor)
                    report.bytes_from_disk += tensor.numel() * dtype.itemsize
                    if progress is not None:
                        progress(tensor.numel() * dtype.itemsize)
    except BaseException:
        for taken in units.values():
            pool.release(taken)
        raise
    report.bytes_total = sum(u.nbytes for u in units.values())
    return units


def _read_tensor(f, path: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        tensor = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: cannot read tensor '{name}' ({e})") from e
    if tuple(tensor.shape) != shape:
        raise ModelFormatError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                               f"config.json implies {shape}")
    if not tensor.dtype.is_floating_point:
        raise ModelFormatError(f"{path}: tensor '{name}' has dtype {tensor.dtype}")
    return tensor


def weight_views(pool: BlockPool, units: dict[str, Unit], spec: ModelSpec,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    plan = dense.weight_plan(spec)
    return {name: pool.view(unit, dtype, plan[name].shape) for name, unit in units.items()}


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
