"""The task pack: a task is its base model plus a block-sparse set of changed weight blocks.

A pack is a folder of the model store whose name is the task's model id:

    models/<task>/task.json           what the task is (below)
    models/<task>/blocks.safetensors  one tensor per distinct block, named by its content key
    models/<task>/tokenizer*.json ... optional; the base's are used where absent

task.json:

    {"format": "edgeserve.task-pack", "version": 1, "base": "<base model id>",
     "block": [rows, cols], "dtype": "float32", "budget": 0.1, "aligned": true,
     "base_hash": "<hash of the base tensors it changes>",
     "weights": {"<HF tensor name>": {"shape": [R, C],
                                      "blocks": [[row block, col block, "<key>"], ...],
                                      "zero": [[row block, col block], ...]}},
     "vectors": {"<HF tensor name>": "<key>"},
     "error": {...}}

Each listed block (r, c) replaces rows r*rows..(r+1)*rows-1 and columns c*cols..
(c+1)*cols-1 of that weight (a linear layer's, or the token embeddings); a zero block is
pruned to zeros (no bytes stored); a vector (a norm's weight, a bias) replaces that 1-D
tensor whole; everything else is the base's. The key is a hash of the block's dtype, shape and
bytes, so equal blocks of different tasks are one block, read and held once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from edgeserve.arch.spec import ModelFormatError

TASK_FILE = "task.json"
BLOCKS_FILE = "blocks.safetensors"
FORMAT = "edgeserve.task-pack"
VERSION = 1
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def is_task_dir(path: Path) -> bool:
    return (path / TASK_FILE).is_file()


def parse_block(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """'64' -> (64, 64); '32x64' -> (32, 64)."""
    if isinstance(text, tuple):
        rows, cols = text
    elif isinstance(text, int):
        rows = cols = text
    else:
        parts = text.lower().split("x")
        try:
            rows, cols = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
        except ValueError:
            raise ValueError(f"block size {text!r} is not N or RxC (e.g. 64 or 32x64)") from None
        if len(parts) > 2:
            raise ValueError(f"block size {text!r} is not N or RxC (e.g. 64 or 32x64)")
    if rows < 1 or cols < 1:
        raise ValueError(f"block size {rows}x{cols} must be positive")
    return rows, cols


def block_key(tile: torch.Tensor) -> str:
    """Content key of one block: its dtype, shape and bytes."""
    h = hashlib.blake2b(f"{tile.dtype}|{tuple(tile.shape)}|".encode(), digest_size=16)
    h.update(tile.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class PackedWeight:
    shape: tuple[int, int]
    blocks: tuple[tuple[int, int, str], ...]     # (row block, col block, content key)
    zero: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TaskPack:
    id: str
    base: str
    block: tuple[int, int]
    dtype: str                                   # of the stored blocks
    weights: dict[str, PackedWeight]
    budget: float = 1.0
    aligned: bool = True
    error: dict[str, Any] = field(default_factory=dict)
    base_hash: str = ""                          # of the base weights it was made from
    vectors: dict[str, str] = field(default_factory=dict)   # 1-D tensor name -> key

    @cached_property
    def keys(self) -> set[str]:
        return {key for w in self.weights.values() for _, _, key in w.blocks}

    @property
    def num_blocks(self) -> int:
        return sum(len(w.blocks) for w in self.weights.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "base": self.base,
                "block": list(self.block), "dtype": self.dtype, "budget": self.budget,
                "aligned": self.aligned, "base_hash": self.base_hash,
                "weights": {name: {"shape": list(w.shape),
                                   "blocks": [list(b) for b in w.blocks],
                                   "zero": [list(z) for z in w.zero]}
                            for name, w in self.weights.items()},
                "vectors": self.vectors, "error": self.error}

    def write(self, folder: Path, tiles: dict[str, torch.Tensor],
              first: set[str] | None = None) -> None:
        """Write task.json and the blocks (every key the pack names must be in tiles); the
        keys in `first` (blocks other tasks share) lead the file, so that a switch which
        needs only the others reads one contiguous run."""
        missing = (self.keys | set(self.vectors.values())) - tiles.keys()
        if missing:
            raise ValueError(f"{len(missing)} blocks of task '{self.id}' have no data")
        folder.mkdir(parents=True, exist_ok=True)
        first = first or set()
        order = sorted(self.keys | set(self.vectors.values()), key=lambda k: (k not in first, k))
        write_safetensors(folder / BLOCKS_FILE, [(k, tiles[k]) for k in order])
        tmp = folder / (TASK_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(folder / TASK_FILE)     # task.json last: a half-written pack is no pack

    @classmethod
    def read(cls, folder: Path) -> TaskPack:
        path = folder / TASK_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: not a readable task pack ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ModelFormatError(f"{path}: 'format' is not {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ModelFormatError(f"{path}: pack version {raw.get('version')!r} is not "
                                   f"{VERSION}; pack the task again")
        try:
            block = parse_block(tuple(raw["block"]))
            weights = {str(name): _weight(w, block) for name, w in raw["weights"].items()}
            return cls(folder.name, str(raw["base"]), block, str(raw["dtype"]), weights,
                       float(raw.get("budget", 1.0)), bool(raw.get("aligned", True)),
                       dict(raw.get("error", {})), str(raw.get("base_hash", "")),
                       {str(k): str(v) for k, v in raw.get("vectors", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{path}: malformed task pack ({e!r})") from e


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file with the tensors in the order given (the library sorts them)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                   # data starts 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def _weight(raw: dict[str, Any], block: tuple[int, int]) -> PackedWeight:
    rows, cols = (int(n) for n in raw["shape"])
    if rows % block[0] or cols % block[1]:
        raise ValueError(f"shape {rows}x{cols} is not a multiple of the block {block}")
    grid = (rows // block[0], cols // block[1])
    blocks = tuple((int(r), int(c), str(k)) for r, c, k in raw["blocks"])
    zero = tuple((int(r), int(c)) for r, c in raw.get("zero", []))
    for r, c in [(b[0], b[1]) for b in blocks] + list(zero):
        if not (0 <= r < grid[0] and 0 <= c < grid[1]):
            raise ValueError(f"block ({r}, {c}) lies outside the {grid[0]}x{grid[1]} grid")
    return PackedWeight((rows, cols), blocks, zero)
