"""A loaded task: its pack's blocks pinned in the arena, indexed per pool unit.

Loading is split like a model's: `scan` (any thread) reads and checks the pack against its
base; `prepare` (engine thread) pins the resident blocks and gives slots to the rest;
`fill` (a loader thread) reads those from the pack. Only blocks not resident are read:
switching from one task to another moves exactly the new task's missing blocks.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelFormatError, ModelSpec
from edgeserve.blocks.arena import Slot, TileArena
from edgeserve.blocks.pack import BLOCKS_FILE, TaskPack
from edgeserve.blocks.targets import Target, linear_targets, vector_targets
from edgeserve.blocks.vectors import TaskVectors, prepare_vectors
from edgeserve.checkpoint import HashCache, TensorInfo, read_header
from edgeserve.kv import kv_identity
from edgeserve.loader import LoadReport, scan_checkpoint
from edgeserve.pool import Unit
from edgeserve.tiers import DiskJob


def base_fingerprint(model_dir: Path, spec: ModelSpec, hashes: HashCache) -> str:
    """A hash of the base tensors that packs change (content hashes, cached). Defined over
    blake2b tensor hashes, so packs made before blake3 keys stay valid."""
    tensors = scan_checkpoint(model_dir)
    per_file: dict[Path, dict[str, str]] = {}
    h = hashlib.blake2b(digest_size=16)
    names = set(linear_targets(spec)) | set(vector_targets(spec))
    for name in sorted(n for n in names if n in tensors):
        path = tensors[name].path
        if path not in per_file:
            per_file[path] = hashes.get(path, "blake2b")
        h.update(f"{name}={per_file[path][name]};".encode())
    return h.hexdigest()


READ_RUN = 2 << 20          # bytes of adjacent blocks read by one request at most

# unit name -> (row blocks, column blocks, addresses in arena.tiles), each (n,) int64, and
# the blocks' rows in the base weight seen as (R * C/bc, bc) rows of one block's width,
# (n * br,) int64: gathered as embedding rows, the fastest gather torch has on the CPU
Index = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskSource:
    pack: TaskPack
    folder: Path
    blocks: dict[str, TensorInfo]       # content key -> where its bytes are in the pack

    @classmethod
    def scan(cls, folder: Path, spec: ModelSpec, base_dir: Path | None = None,
             hashes: HashCache | None = None) -> TaskSource:
        """The pack at folder, checked against its base (and, given base_dir and hashes,
        against the base's bytes it was made from)."""
        pack = TaskPack.read(folder)
        if pack.base_hash and base_dir is not None and hashes is not None and \
                base_fingerprint(base_dir, spec, hashes) != pack.base_hash:
            raise ModelFormatError(f"{folder}: the pack was made from other weights than the "
                                   f"base '{pack.base}' now has; pack the task again")
        targets = linear_targets(spec)
        br, bc = pack.block
        for name, weight in pack.weights.items():
            target = targets.get(name)
            if target is None:
                raise ModelFormatError(f"{folder}: task changes '{name}', which is not a "
                                       f"linear weight of its base '{pack.base}'")
            if weight.shape != target.shape:
                raise ModelFormatError(f"{folder}: '{name}' is {weight.shape} in the pack but "
                                       f"{target.shape} in the base '{pack.base}'")
            if target.row % br:
                raise ModelFormatError(f"{folder}: block rows {br} do not divide the offset "
                                       f"of '{name}' in its fused unit ({target.row})")
        path = folder / BLOCKS_FILE
        blocks = {t.name: t for t in read_header(path)} if pack.keys or pack.vectors else {}
        for key in pack.keys:
            info = blocks.get(key)
            if info is None:
                raise ModelFormatError(f"{path}: lacks block {key}")
            if info.shape != (br, bc):
                raise ModelFormatError(f"{path}: block {key} is {info.shape}, not {(br, bc)}")
        vectors = vector_targets(spec)
        for name, key in pack.vectors.items():
            if name not in vectors:
                raise ModelFormatError(f"{folder}: task changes '{name}', which is not a norm "
                                       f"or bias of its base '{pack.base}'")
            info = blocks.get(key)
            if info is None or info.shape != (vectors[name].shape[0],):
                raise ModelFormatError(f"{path}: lacks vector {key} of {vectors[name].shape[0]} "
                                       f"values for '{name}'")
        return cls(pack, folder, blocks)

    @property
    def has_zero(self) -> bool:
        return any(w.zero for w in self.pack.weights.values())

    @cached_property
    def ordered_keys(self) -> list[str]:
        """The pack's blocks in file order."""
        return sorted(self.pack.keys, key=lambda k: self.blocks[k].start)

    @cached_property
    def follows(self) -> dict[str, str]:
        """key -> the key of the block whose bytes end where its bytes begin."""
        keys, blocks = self.ordered_keys, self.blocks
        return {key: prev for prev, key in itertools.pairwise(keys)
                if blocks[key].start == blocks[prev].end}


@dataclass(eq=False)
class TaskBlocks:
    """What one loaded task holds: its blocks (index(unit) says where they go in a forward)
    and its vectors (vector(unit))."""

    source: TaskSource
    arena: TileArena
    slots: dict[str, Slot]
    targets: dict[str, Target]              # checkpoint name -> pool unit and first row
    vectors: TaskVectors | None = None      # its norms and biases, if it changes any
    _index: dict[str, Index] = field(default_factory=dict)
    _tables: dict[str, torch.Tensor] = field(default_factory=dict)    # embed_table's
    _epoch: int = -1

    @property
    def pack(self) -> TaskPack:
        return self.source.pack

    @cached_property
    def identity(self) -> str:
        """The task's changes, block by block: part of its KV identity."""
        pack = self.pack
        parts = [f"{pack.block}|{pack.dtype}"]
        for name in sorted(pack.weights):
            w = pack.weights[name]
            parts.append(f"{name}:{sorted(w.blocks)}:{sorted(w.zero)}")
        parts += [f"{name}={key}" for name, key in sorted(pack.vectors.items())]
        return kv_identity(parts)

    @property
    def units(self) -> list[Unit]:
        units = {id(s.chunk.unit): s.chunk.unit for s in self.slots.values()}
        if self.vectors is not None:
            units[id(self.vectors.unit)] = self.vectors.unit
        return list(units.values())

    @property
    def nbytes(self) -> int:
        vectors = self.vectors.unit.nbytes if self.vectors is not None else 0
        return len(self.slots) * self.arena.tile_bytes + vectors

    def vector(self, unit: str) -> torch.Tensor | None:
        """The task's whole value of a norm or bias unit, if it changed it."""
        return self.vectors.view(unit) if self.vectors is not None else None

    def index(self, unit: str) -> Index | None:
        pool = self.arena.pool
        if self._epoch != pool.epoch:       # compaction moved chunks or weights: re-address
            self._index, self._tables = self._build(), {}
            self._epoch = pool.epoch
        return self._index.get(unit)

    def embed_table(self, unit: str, rows: int, cols: int) -> torch.Tensor:
        """(rows/br, cols/bc) address of each of the task's blocks of an embedding matrix
        (rows x cols) in arena.tiles, -1 where it keeps the base's; built with the index."""
        index = self.index(unit)
        table = self._tables.get(unit)
        if table is None:
            assert index is not None
            br, bc = self.pack.block
            r, c, addr = index[:3]
            table = torch.full((rows // br, cols // bc), -1, dtype=torch.int64,
                               device=addr.device)
            table[r, c] = addr
            self._tables[unit] = table
        return table

    def _build(self) -> dict[str, Index]:
        pack, arena = self.pack, self.arena
        br = pack.block[0]
        rows: dict[str, list[tuple[int, int, int]]] = {}
        columns: dict[str, int] = {}
        zero = self.slots.get(zero_key(arena))
        for name, weight in pack.weights.items():
            target = self.targets[name]
            first = target.row // br
            columns[target.unit] = target.shape[1]
            out = rows.setdefault(target.unit, [])
            out.extend((first + r, c, arena.address(self.slots[k])) for r, c, k in weight.blocks)
            if weight.zero:
                assert zero is not None
                out.extend((first + r, c, arena.address(zero)) for r, c in weight.zero)
        device = torch.device(arena.pool.device)
        index = {}
        for unit, entries in rows.items():
            if entries:
                r, c, addr = torch.tensor(entries, dtype=torch.int64, device=device).T
                index[unit] = block_index(r, c, addr, pack.block, columns[unit])
        return index

    def release(self) -> None:
        self.arena.release(self.slots)
        self.slots = {}
        self._index, self._tables = {}, {}
        if self.vectors is not None:
            self.vectors.release()
            self.vectors = None


def block_index(rows: torch.Tensor, cols: torch.Tensor, addr: torch.Tensor,
                block: tuple[int, int], columns: int) -> Index:
    """The Index of blocks (rows[i], cols[i]) at addr[i], over a weight of `columns`."""
    br, bc = block
    within = torch.arange(br, dtype=torch.int64, device=rows.device)
    w_rows = (rows[:, None] * br + within) * (columns // bc) + cols[:, None]
    return rows.contiguous(), cols.contiguous(), addr.contiguous(), w_rows.reshape(-1)


def zero_key(arena: TileArena) -> str:
    return f"zero:{arena.name}"


def prepare(source: TaskSource, spec: ModelSpec, arena: TileArena, owner: str,
            report: LoadReport, units: dict[str, Unit]
            ) -> tuple[TaskBlocks, list[DiskJob], list[str]]:
    """Pin the task's blocks (engine thread): resident ones are reused, the rest get slots
    and disk jobs. Returns the blocks, the jobs and the keys those jobs fill.

    Blocks are given slots in file order, so blocks adjacent in the pack land adjacent in
    the pool and each such run is one read (straight into the pool where no conversion is
    needed) rather than one copy per block."""
    blocks, zero = source.blocks, zero_key(arena)
    keys = list(source.ordered_keys)
    if source.has_zero:
        keys.append(zero)
    slots, fresh = arena.acquire(keys, owner)
    try:
        vectors, vector_jobs = prepare_vectors(source.pack.vectors, blocks, spec, arena.pool,
                                               arena.dtype, units, owner, report)
    except BaseException:
        arena.forget(fresh)
        arena.release(slots)
        raise
    if zero in fresh:
        arena.view(slots[zero]).zero_()
    runs: list[list[str]] = []
    most = max(1, READ_RUN // arena.tile_bytes)     # blocks per read: reads run in parallel
    follows = source.follows
    run: list[str] = []
    chunk = None
    for key in fresh:
        if key == zero:
            continue
        slot = slots[key]
        # Fresh blocks take the slots of their chunks in order: a block that follows the
        # last one in the file and in the same chunk is adjacent to it in the pool too.
        if slot.chunk is chunk and len(run) < most and follows.get(key) == run[-1]:
            run.append(key)
        else:
            run = [key]
            runs.append(run)
            chunk = slot.chunk
    jobs = [_job(arena, slots, blocks, run) for run in runs]
    moved = sum(map(len, runs)) * arena.tile_bytes
    report.bytes_from_disk += moved
    report.bytes_from_device += len(source.pack.keys) * arena.tile_bytes - moved
    report.bytes_total += len(source.pack.keys) * arena.tile_bytes
    return (TaskBlocks(source, arena, slots, linear_targets(spec), vectors), jobs + vector_jobs,
            fresh)


def _job(arena: TileArena, slots: dict[str, Slot], blocks: dict[str, TensorInfo],
         run: list[str]) -> DiskJob:
    """One read for blocks adjacent both in the pack and in the pool."""
    first, last = blocks[run[0]], blocks[run[-1]]
    info = TensorInfo(first.name, first.path, first.dtype, (len(run), *first.shape),
                      first.start, last.end)
    begin = arena.offset(slots[run[0]])
    assert arena.pool.slab is not None
    dest = arena.pool.slab[begin:begin + len(run) * arena.tile_bytes]
    return DiskJob(info, dest.view(arena.dtype).view(len(run), *arena.shape))
