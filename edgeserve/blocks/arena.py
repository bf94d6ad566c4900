"""Task blocks in the pool: many small blocks to a task_block unit, addressed by content.

A 64x64 block (16 KiB in float32) is far smaller than a pool block (256 KiB to 2 MiB), so
blocks live in slots of task_block units (chunks). The arena keeps the slot table:

    content key -> (chunk, slot)      a block read once is found by every task naming it
    chunk       -> keys of its slots  one load's new blocks; goes back to the pool whole

A chunk is pinned while any task using one of its blocks is loaded, and is evicted by the
pool's policy like any unit once nothing pins it (its blocks are then read again from the
pack when needed). Every block of every chunk can be read through one strided view of the
slab (`tiles`), so a forward gathers a task's blocks with one index_select.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from edgeserve.pool import BlockPool, Unit, UnitKind

_arena_ids = itertools.count(1)
CHUNK_MAX = 4 << 20


@dataclass(eq=False, slots=True)
class Chunk:
    unit: Unit
    slots: int                                          # blocks it can hold
    keys: list[str] = field(default_factory=list)       # slot -> content key


@dataclass(frozen=True, slots=True)
class Slot:
    chunk: Chunk
    index: int


class TileArena:
    def __init__(self, pool: BlockPool, shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.pool, self.shape, self.dtype = pool, shape, dtype
        self.tile_bytes = shape[0] * shape[1] * dtype.itemsize
        # A load's new blocks go to chunks of up to CHUNK_MAX bytes: few allocations, and
        # eviction by one load's worth of blocks at most.
        self.min_chunk = math.ceil(self.tile_bytes / pool.block_size) * pool.block_size
        self.max_chunk = max(self.min_chunk, CHUNK_MAX // pool.block_size * pool.block_size)
        # Offsets of chunk starts and slots are multiples of this many bytes.
        self.step = math.gcd(pool.block_size, self.tile_bytes)
        self.name = f"tiles{next(_arena_ids)}:{shape[0]}x{shape[1]}:{dtype}"
        self.chunks: dict[int, Chunk] = {}                   # unit id -> chunk
        self.table: dict[str, Slot] = {}
        self._tiles: torch.Tensor | None = None
        self._epoch = -1
        self._numbers = itertools.count()
        pool.on_evict.append(self._evicted)

    def __contains__(self, key: str) -> bool:
        return key in self.table

    @property
    def resident_bytes(self) -> int:
        return len(self.table) * self.tile_bytes

    def acquire(self, keys: list[str], owner: str) -> tuple[dict[str, Slot], list[str]]:
        """Pin the blocks of keys, giving slots to those not resident (returned second, to be
        filled by the caller). Raises PoolFull having pinned and allocated nothing.

        The new blocks of one load go to chunks of their own, so that a task's blocks leave
        together when it is no longer used (a chunk goes only when none of its blocks is)."""
        wanted = list(dict.fromkeys(keys))
        table = self.table
        slots = {k: s for k in wanted if (s := table.get(k)) is not None}
        self._pin(slots.values())           # first, so that allocating never evicts them
        missing = [k for k in wanted if k not in slots] if slots else wanted
        new: list[Chunk] = []
        try:
            left = len(missing)
            while left > 0:
                nbytes = min(self.max_chunk, math.ceil(left * self.tile_bytes / self.min_chunk)
                             * self.min_chunk)
                unit = self.pool.allocate(UnitKind.TASK_BLOCK, nbytes, owner=owner,
                                          key=f"{self.name}:{next(self._numbers)}")
                new.append(Chunk(unit, nbytes // self.tile_bytes))
                left -= new[-1].slots
        except BaseException:
            for done in new:
                self.pool.release(done.unit)
            self.release(slots)
            raise
        first = 0
        for chunk in new:                   # missing keys fill the new chunks in order
            chunk.keys = missing[first:first + chunk.slots]
            first += len(chunk.keys)
            self.chunks[chunk.unit.id] = chunk
            placed = dict(zip(chunk.keys, map(Slot, itertools.repeat(chunk),
                                              range(len(chunk.keys))), strict=True))
            table.update(placed)
            slots.update(placed)
            self.pool.pin(chunk.unit, len(chunk.keys) - 1)   # allocate()'s pin, now per block
        return slots, missing

    def release(self, slots: dict[str, Slot]) -> None:
        """Unpin blocks; they stay resident (and shared) until their chunk is evicted."""
        for chunk, n in self._per_chunk(slots.values()):
            if chunk.unit.alive:
                self.pool.unpin(chunk.unit, n)

    def _pin(self, slots: Iterable[Slot]) -> None:
        for chunk, n in self._per_chunk(slots):
            self.pool.pin(chunk.unit, n)

    @staticmethod
    def _per_chunk(slots: Iterable[Slot]) -> list[tuple[Chunk, int]]:
        """Each chunk among slots, with how many of them it holds (one pin per block)."""
        return list(Counter(map(attrgetter("chunk"), slots)).items())

    def drop_unused(self) -> int:
        """Evict every chunk no loaded task uses; returns how many went."""
        unused = [c.unit for c in self.chunks.values() if c.unit.pins == 0]
        for unit in unused:
            self.pool.evict_unit(unit)
        return len(unused)

    def forget(self, keys: list[str]) -> None:
        """Blocks whose filling failed: drop them from the table (their slots stay used)."""
        for key in keys:
            self.table.pop(key, None)

    def offset(self, slot: Slot) -> int:
        """The block's first byte in the slab."""
        return slot.chunk.unit.start * self.pool.block_size + slot.index * self.tile_bytes

    def view(self, slot: Slot) -> torch.Tensor:
        """(rows, cols) over the block's bytes; stale after compaction."""
        begin = self.offset(slot)
        assert self.pool.slab is not None
        return self.pool.slab[begin:begin + self.tile_bytes].view(self.dtype).view(self.shape)

    def address(self, slot: Slot) -> int:
        """The block's index in `tiles`."""
        return self.offset(slot) // self.step

    @property
    def tiles(self) -> torch.Tensor:
        """The slab as (N, rows, cols) blocks starting every `step` bytes (overlapping where
        step is smaller than a block): any slot is tiles[address(slot)]."""
        if self._tiles is None or self._epoch != self.pool.epoch:
            assert self.pool.slab is not None
            flat = self.pool.slab.view(self.dtype)
            elems, step = self.tile_bytes // self.dtype.itemsize, self.step // self.dtype.itemsize
            count = (flat.numel() - elems) // step + 1
            self._tiles = flat.as_strided((count, *self.shape), (step, self.shape[1], 1))
            self._epoch = self.pool.epoch
        return self._tiles

    def _evicted(self, unit: Unit) -> None:
        chunk = self.chunks.pop(unit.id, None)
        if chunk is None:
            return
        for key in chunk.keys:
            if self.table.get(key, None) is not None and self.table[key].chunk is chunk:
                del self.table[key]

    def check(self) -> None:
        """Every table entry points into a live chunk of this arena, at its own slot."""
        for key, slot in self.table.items():
            assert slot.chunk.unit.alive and self.chunks.get(slot.chunk.unit.id) is slot.chunk
            assert slot.chunk.keys[slot.index] == key


def arena_stats(arenas: list[TileArena]) -> dict[str, int]:
    """Distinct task blocks resident, their bytes, and the bytes of the chunks holding them."""
    return {"blocks": sum(len(a.table) for a in arenas),
            "bytes": sum(a.resident_bytes for a in arenas),
            "chunk_bytes": sum(c.unit.nbytes for a in arenas for c in a.chunks.values())}
