"""Where a task's weights come from when packing: a fine-tuned checkpoint or a LoRA adapter.

Both read lazily, one tensor at a time, so packing never holds a whole model in memory.
A LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors) is merged
into its base as W + scale * B @ A, with scale = alpha / r (alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Protocol

import torch

from edgeserve.arch.spec import ModelFormatError
from edgeserve.checkpoint import TensorInfo, read_header, read_into
from edgeserve.loader import scan_checkpoint

log = logging.getLogger("edgeserve.blocks")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class WeightSource(Protocol):
    name: str

    def dtype(self, tensor: str) -> torch.dtype: ...

    def get(self, tensor: str) -> torch.Tensor: ...

    def names(self) -> set[str]: ...


def read_tensor(info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    read_into(info.path, info.start, buf.numpy().data)
    return buf.view(info.dtype).view(info.shape)


class Checkpoint:
    """A Hugging Face model folder (single file or sharded)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.name = folder, folder.name
        self.tensors = scan_checkpoint(folder)

    def names(self) -> set[str]:
        return set(self.tensors)

    def dtype(self, tensor: str) -> torch.dtype:
        return self.tensors[tensor].dtype

    def get(self, tensor: str) -> torch.Tensor:
        info = self.tensors.get(tensor)
        if info is None:
            raise ModelFormatError(f"{self.folder}: checkpoint lacks tensor '{tensor}'")
        return read_tensor(info)


class LoraAdapter:
    """A PEFT LoRA adapter over base, read as the merged weights it stands for."""

    def __init__(self, folder: Path, base: Checkpoint) -> None:
        self.folder, self.name, self.base = folder, folder.name, base
        cfg_path = folder / ADAPTER_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{cfg_path}: not a readable adapter config ({e})") from e
        if cfg.get("peft_type", "LORA").upper() != "LORA":
            raise ModelFormatError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
        for flag in ("use_dora", "fan_in_fan_out"):
            if cfg.get(flag):
                raise ModelFormatError(f"{cfg_path}: '{flag}' adapters are not supported")
        self.rank, self.alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.rslora = bool(cfg.get("use_rslora", False))
        self.rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
        self.alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelFormatError(f"{folder}: no {ADAPTER_WEIGHTS}")
        self.pairs: dict[str, tuple[TensorInfo, TensorInfo]] = {}
        found: dict[str, dict[str, TensorInfo]] = {}
        ignored = []
        for info in read_header(weights):
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$",
                         info.name)
            if m is None:
                ignored.append(info.name)
                continue
            found.setdefault(m.group(1) + ".weight", {})[m.group(2)] = info
        for tensor, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise ModelFormatError(f"{weights}: '{tensor}' lacks lora_A or lora_B")
            if tensor not in base.tensors:
                raise ModelFormatError(f"{weights}: adapts '{tensor}', which the base lacks")
            self.pairs[tensor] = (ab["A"], ab["B"])
        if ignored:
            log.warning("%s: %d tensors that are not LoRA pairs are ignored (e.g. %s)",
                        folder, len(ignored), ignored[0])

    def names(self) -> set[str]:
        return self.base.names()

    def dtype(self, tensor: str) -> torch.dtype:
        return self.base.dtype(tensor)

    def scale(self, tensor: str) -> float:
        module = tensor.removesuffix(".weight")
        rank = next((r for p, r in self.rank_pattern.items() if _matches(module, p)), self.rank)
        alpha = next((a for p, a in self.alpha_pattern.items() if _matches(module, p)),
                     self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def get(self, tensor: str) -> torch.Tensor:
        weight = self.base.get(tensor)
        pair = self.pairs.get(tensor)
        if pair is None:
            return weight
        a, b = (read_tensor(t).to(torch.float32) for t in pair)   # A (r, in), B (out, r)
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            raise ModelFormatError(f"{self.folder}: LoRA of '{tensor}' has shapes "
                                   f"{tuple(b.shape)} @ {tuple(a.shape)}, the weight "
                                   f"{tuple(weight.shape)}")
        merged = weight.to(torch.float32) + self.scale(tensor) * (b @ a)
        return merged.to(weight.dtype)


def _matches(module: str, pattern: str) -> bool:
    return module == pattern or module.endswith("." + pattern) or \
        re.fullmatch(pattern, module) is not None


def open_source(folder: Path, base: Checkpoint) -> WeightSource:
    """A fine-tuned checkpoint folder, or a LoRA adapter folder, as a weight source."""
    if (folder / ADAPTER_CONFIG).is_file():
        return LoraAdapter(folder, base)
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder}: neither a model folder (config.json) nor a LoRA "
                               f"adapter ({ADAPTER_CONFIG})")
    return Checkpoint(folder)
