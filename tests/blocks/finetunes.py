"""Fine-tunes of a tiny base made locally: changed blocks, pruned blocks, LoRA adapters;
and the reference checkpoint a pack stands for (base plus the pack's blocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgeserve.blocks.pack import BLOCKS_FILE, TaskPack

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _copy_base(base: Path, out: Path) -> dict[str, torch.Tensor]:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors",
                                                          "model.safetensors.index.json"))
    return load_weights(base)          # sharded or not: saved as one


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, from all its safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def save_weights(out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """tensors as the folder's single model.safetensors."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def make_finetune(base: Path, out: Path, seed: int, *, block: int = 16, fraction: float = 0.3,
                  scale: float = 0.05, common: dict[str, torch.Tensor] | None = None,
                  prune: int = 0, noise: float = 0.0) -> Path:
    """base with `fraction` of its linear blocks changed at random (plus `common`, a change
    shared by every task, plus `noise` everywhere), and `prune` blocks zeroed."""
    tensors = _copy_base(base, out)
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        if w.dim() != 2 or not any(f".{n}." in name for n in LINEARS):
            continue
        rows, cols = w.shape[0] // block, w.shape[1] // block
        mask = torch.rand(rows, cols, generator=gen) < fraction
        full = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
        delta = torch.randn(w.shape, generator=gen) * scale * full
        if noise:
            delta += torch.randn(w.shape, generator=gen) * noise
        if common is not None and name in common:
            delta += common[name]
        w = w + delta.to(w.dtype)
        for _ in range(prune):
            r = int(torch.randint(rows, (1,), generator=gen))
            c = int(torch.randint(cols, (1,), generator=gen))
            w[r * block:(r + 1) * block, c * block:(c + 1) * block] = 0
        tensors[name] = w
    return save_weights(out, tensors)


def common_change(base: Path, seed: int, *, block: int = 16, fraction: float = 0.2,
                  scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A change several tasks share exactly (as tasks tuned from one intermediate do)."""
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in tensors.items():
        if w.dim() == 2 and any(f".{n}." in name for n in LINEARS):
            mask = torch.rand(w.shape[0] // block, w.shape[1] // block, generator=gen) < fraction
            full = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
            out[name] = torch.randn(w.shape, generator=gen) * scale * full
    return out


def make_lora(base: Path, out: Path, seed: int, rank: int = 4, alpha: float = 8.0,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Path:
    """A PEFT-layout LoRA adapter of base (adapter_config.json + adapter_model.safetensors)."""
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    lora = {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if w.dim() == 2 and module.split(".")[-1] in targets:
            lora[f"base_model.model.{module}.lora_A.weight"] = \
                torch.randn(rank, w.shape[1], generator=gen) * 0.1
            lora[f"base_model.model.{module}.lora_B.weight"] = \
                torch.randn(w.shape[0], rank, generator=gen) * 0.1
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
         "base_model_name_or_path": str(base)}))
    return out


def make_full_finetune(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """base with every tensor changed a little (norms, biases and embeddings too), as a
    full fine-tune changes them."""
    tensors = _copy_base(base, out)
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        tensors[name] = w + (torch.randn(w.shape, generator=gen) * scale).to(w.dtype)
    return save_weights(out, tensors)


def reconstruct(base: Path, pack_dir: Path, out: Path) -> Path:
    """The checkpoint a task pack stands for: the base with the pack's blocks and vectors
    written in."""
    pack = TaskPack.read(pack_dir)
    tensors = _copy_base(base, out)
    blocks = load_file(str(pack_dir / BLOCKS_FILE)) if pack.keys or pack.vectors else {}
    for name, key in pack.vectors.items():
        tensors[name] = blocks[key].to(tensors[name].dtype)
    br, bc = pack.block
    for name, weight in pack.weights.items():
        w = tensors[name].clone()
        for r, c, key in weight.blocks:
            w[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = blocks[key].to(w.dtype)
        for r, c in weight.zero:
            w[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = 0
        tensors[name] = w
    return save_weights(out, tensors)
