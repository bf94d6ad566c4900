"""Where a task's weights come from when packing: a fine-tuned checkpoint or a LoRA adapter.

Both read lazily, one tensor at a time, so packing never holds a whole model in memory.
A LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors) is merged
into its base as W + scale * B @ A, with scale = alpha / r (alpha / sqrt(r) with rsLoRA);
the whole tensors it saves besides (modules_to_save, trained biases) replace the base's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from edgeserve.arch.plan import EMBED, HEAD
from edgeserve.arch.spec import ModelFormatError, ModelSpec
from edgeserve.blocks.pack import is_task_dir
from edgeserve.checkpoint import TensorInfo, read_header, read_tensor
from edgeserve.loader import read_spec, scan_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Config fields a fine-tune may change: they do not change what the weights compute (the
# architecture's name alone neither: a "llamafied" Mistral computes as the Mistral).
FREE_FIELDS = ("architecture", "checkpoint_dtype", "bos_token_id", "eos_token_ids",
               "max_positions")
# PEFT's saved names (adapter name removed, or still there: '.default'), after the prefix.
LORA_PAIR = re.compile(r"^(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$")
LORA_EMBEDDING = re.compile(r"^(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?$")
WHOLE = re.compile(r"^(.+?)(?:\.modules_to_save(?:\.[^.]+)?|\.base_layer)?\.(weight|bias)$")
# Adapter options that make the merged weights other than W + scale * B @ A.
REFUSED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out",
           "lora_bias": "lora_bias (a bias on lora_B)", "layer_replication": "layer_replication",
           "trainable_token_indices": "trainable_token_indices"}


class WeightSource(Protocol):
    name: str

    def dtype(self, tensor: str) -> torch.dtype: ...

    def get(self, tensor: str) -> torch.Tensor: ...

    def names(self) -> set[str]: ...


class Checkpoint:
    """A Hugging Face model folder (single file or sharded)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.name = folder, folder.name
        self.tensors = scan_checkpoint(folder)

    def names(self) -> set[str]:
        return set(self.tensors)

    def info(self, tensor: str) -> TensorInfo:
        info = self.tensors.get(tensor)
        if info is None:
            like = next((n for n in sorted(self.tensors) if n.endswith("." + tensor)), None)
            hint = f" (it has '{like}': its names carry a prefix)" if like else ""
            raise ModelFormatError(f"{self.folder}: checkpoint lacks tensor '{tensor}'{hint}")
        return info

    def dtype(self, tensor: str) -> torch.dtype:
        return self.info(tensor).dtype

    def get(self, tensor: str) -> torch.Tensor:
        return read_tensor(self.info(tensor))


def check_fine_tune(ft: Checkpoint, base: Checkpoint, spec: ModelSpec) -> None:
    """ft has the base's tensors, shapes and architecture: it is a fine-tune of it. Names
    that all carry one prefix (a state dict saved from a wrapper: 'module.', '_orig_mod.')
    are read without it."""
    ft_spec = read_spec(ft.folder)
    prefixed = [n for n in ft.tensors if n.endswith("." + EMBED)]
    if EMBED not in ft.tensors and len(prefixed) == 1:
        prefix = prefixed[0].removesuffix(EMBED)
        if all(n.startswith(prefix) for n in ft.tensors):
            ft.tensors = {n.removeprefix(prefix): info for n, info in ft.tensors.items()}
    for name, info in base.tensors.items():
        if is_buffer(name) or (name == HEAD and spec.tie_embeddings):
            continue                    # a tied base's saved head is not served either
        shape = ft.info(name).shape
        if shape != info.shape:
            raise ModelFormatError(f"{ft.folder}: '{name}' has shape {shape}, the base "
                                   f"{info.shape}: not a fine-tune of this base (a resized "
                                   f"vocabulary or another architecture)")
    for name in sorted(ft.names() - base.names()):
        if is_buffer(name) or (name == HEAD and spec.tie_embeddings and ft_spec.tie_embeddings):
            continue        # tied: transformers ignores a saved head and uses the embeddings
        what = "unties the head from the embeddings" if name == HEAD else "has a tensor"
        raise ModelFormatError(f"{ft.folder}: {what} '{name}' that the base lacks: not a "
                               f"fine-tune of this base")
    theirs = replace(ft_spec, **{f: getattr(spec, f) for f in FREE_FIELDS})
    changed = [f.name for f in fields(spec) if getattr(theirs, f.name) != getattr(spec, f.name)]
    if changed:
        raise ModelFormatError(f"{ft.folder}/config.json: differs from the base's in "
                               f"{', '.join(changed)}: not a fine-tune of this base")


def is_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")      # saved by old transformers, recomputed


class LoraAdapter:
    """A PEFT LoRA adapter over base, read as the merged weights it stands for."""

    def __init__(self, folder: Path, base: Checkpoint) -> None:
        self.folder, self.name, self.base = folder, folder.name, base
        cfg = _adapter_config(folder / ADAPTER_CONFIG)
        self.alpha = _number(cfg, "lora_alpha", 8.0, folder)
        self.rslora = bool(cfg.get("use_rslora", False))
        self.alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelFormatError(f"{folder}: no {ADAPTER_WEIGHTS}")
        # tensor -> (A, B, embedding?) of its LoRA; tensor -> a whole replacement.
        self.pairs: dict[str, tuple[TensorInfo, TensorInfo, bool]] = {}
        self.whole: dict[str, TensorInfo] = {}
        found: dict[tuple[str, bool], dict[str, TensorInfo]] = {}
        for info in read_header(weights):
            name = info.name.removeprefix("base_model.model.")
            if ".original_module." in name:
                continue                       # modules_to_save's copy of the base's own
            if m := LORA_PAIR.match(name):
                found.setdefault((m.group(1), False), {})[m.group(2)] = info
            elif m := LORA_EMBEDDING.match(name):
                found.setdefault((m.group(1), True), {})[m.group(2)] = info
            elif ".lora_" in name or "trainable_tokens" in name or not (m := WHOLE.match(name)):
                raise ModelFormatError(f"{weights}: tensor '{info.name}' is neither a LoRA "
                                       f"pair nor a weight of the base: not supported")
            else:
                tensor = self._base_name(f"{m.group(1)}.{m.group(2)}", weights)
                self._check_shape(tensor, info.shape, weights)
                self.whole[tensor] = info
        for (module, embedding), ab in found.items():
            if set(ab) != {"A", "B"}:
                raise ModelFormatError(f"{weights}: '{module}' lacks lora_A or lora_B")
            tensor = self._base_name(module + ".weight", weights)
            self._check_pair(tensor, ab["A"], ab["B"], embedding, weights)
            self.pairs[tensor] = (ab["A"], ab["B"], embedding)

    def _base_name(self, tensor: str, weights: Path) -> str:
        """The base's name of a tensor the adapter changes (adapters of a bare LlamaModel
        name its layers without 'model.')."""
        for name in (tensor, "model." + tensor):
            if name in self.base.tensors:
                return name
        if tensor == HEAD and EMBED in self.base.tensors:
            raise ModelFormatError(f"{weights}: changes '{HEAD}', which the base ties to its "
                                   f"embeddings '{EMBED}': not supported (adapt the "
                                   f"embeddings instead)")
        raise ModelFormatError(f"{weights}: changes '{tensor}', which the base lacks")

    def _check_shape(self, tensor: str, shape: tuple[int, ...], weights: Path) -> None:
        want = self.base.tensors[tensor].shape
        if shape != want:
            raise ModelFormatError(f"{weights}: '{tensor}' has shape {shape}, the base {want}: "
                                   f"not an adapter of this base (a resized vocabulary?)")

    def _check_pair(self, tensor: str, a: TensorInfo, b: TensorInfo, embedding: bool,
                    weights: Path) -> None:
        out, inner = self.base.tensors[tensor].shape
        if embedding:           # A (r, vocab), B (dim, r): the change is (B @ A)^T
            out, inner = inner, out
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or \
                a.shape[1] != inner or b.shape[0] != out:
            raise ModelFormatError(f"{weights}: LoRA of '{tensor}' has shapes {b.shape} @ "
                                   f"{a.shape}, the weight {self.base.tensors[tensor].shape}")

    def names(self) -> set[str]:
        return self.base.names()

    def dtype(self, tensor: str) -> torch.dtype:
        whole = self.whole.get(tensor)
        return whole.dtype if whole is not None else self.base.dtype(tensor)

    def scale(self, tensor: str, rank: int) -> float:
        module = tensor.removesuffix(".weight")
        alpha = self.alpha
        if self.alpha_pattern:
            key = _pattern_key(self.alpha_pattern, module)
            if key is not None:
                alpha = float(self.alpha_pattern[key])
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def get(self, tensor: str) -> torch.Tensor:
        whole = self.whole.get(tensor)
        weight = read_tensor(whole) if whole is not None else self.base.get(tensor)
        pair = self.pairs.get(tensor)
        if pair is None:
            return weight
        a, b = (read_tensor(t).to(torch.float32) for t in pair[:2])   # A (r, in), B (out, r)
        delta = b @ a
        if pair[2]:
            delta = delta.T
        merged = weight.to(torch.float32) + self.scale(tensor, a.shape[0]) * delta
        return merged.to(weight.dtype)


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not a readable adapter config ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path}: not a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelFormatError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag, what in REFUSED.items():
        if cfg.get(flag):
            raise ModelFormatError(f"{path}: {what} adapters are not supported ('{flag}')")
    return cfg


def _number(cfg: dict[str, Any], key: str, default: float, folder: Path) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFormatError(f"{folder / ADAPTER_CONFIG}: '{key}' is {value!r}, not a number")
    return float(value)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The key of rank_pattern / alpha_pattern that applies to module, as PEFT matches it."""
    if module in patterns:
        return module
    try:
        return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    except re.error as e:
        raise ModelFormatError(f"alpha_pattern: a key is not a regular expression ({e})") from e


def open_source(folder: Path, base: Checkpoint, spec: ModelSpec) -> WeightSource:
    """A fine-tuned checkpoint folder, or a LoRA adapter folder, as a weight source."""
    if (folder / ADAPTER_CONFIG).is_file():
        return LoraAdapter(folder, base)
    if is_task_dir(folder):
        raise ModelFormatError(f"{folder}: a task pack, not a fine-tuned checkpoint or a LoRA "
                               f"adapter")
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder}: neither a model folder (config.json) nor a LoRA "
                               f"adapter ({ADAPTER_CONFIG})")
    ft = Checkpoint(folder)
    check_fine_tune(ft, base, spec)
    return ft
