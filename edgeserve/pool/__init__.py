"""The per-device block pool: it owns device memory; everyone else asks it for units and views.

Memory is one slab cut into fixed-size blocks. A unit (a weight tensor, a KV page, an
expert, a task block) occupies a contiguous run of blocks, so a view of it is a plain
strided tensor. Bookkeeping is plain Python over integer block ids, kept apart from the
storage so that it can be tested on the CPU with a tiny block size.

    blocks   | 0 1 2 | 3 | 4 5 | 6 7 8 9 |
    owner    |  u7   | - | u2  |    -    |    free runs: [(3, 1), (6, 4)]

Invariant (check_integrity): every block is free or owned by exactly one unit, free runs
are disjoint and merged, and bytes by kind add up to the owned blocks.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable

import torch

from edgeserve.pool.blocks import Blocks, allocate_slab
from edgeserve.pool.hugepages import Prefault
from edgeserve.pool.units import EvictionPolicy, PoolFull, Unit, UnitKind, lru_order
from edgeserve.pool.usage import Usage

__all__ = ["BlockPool", "EvictionPolicy", "PoolFull", "Unit", "UnitKind", "allocate_slab",
           "lru_order"]


class BlockPool(Usage):
    """Blocks of one device. Thread-safe bookkeeping; data moves only in compact()."""

    def __init__(self, device: str, pool_size: int, block_size: int,
                 policy: EvictionPolicy = lru_order, storage: bool = True) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two, got {block_size}")
        if pool_size < block_size:
            raise ValueError(f"pool size {pool_size} is smaller than one block ({block_size})")
        self.device, self.block_size, self.policy = device, block_size, policy
        self.num_blocks = pool_size // block_size
        self.slab = allocate_slab(device, self.num_blocks * block_size) if storage else None
        self.prefault = Prefault(self.slab)   # CPU: pages faulted in ahead of use
        self.units: dict[int, Unit] = {}
        self.by_key: dict[str, Unit] = {}
        self.epoch = 0                  # bumped whenever units move; cached views go stale
        self.before_evict: list[Callable[[Unit], None]] = []   # the unit's bytes still readable
        self.on_evict: list[Callable[[Unit], None]] = []
        self._frozen = 0                # > 0: a loader copies into units; nothing may move
        self.evictions = 0
        self._blocks = Blocks(self.num_blocks)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        Usage.__init__(self)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_bytes(self) -> int:
        return self._blocks.free * self.block_size

    def blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.block_size))

    # ---- allocate / release --------------------------------------------------------------
    def spare_blocks(self) -> int:
        """Blocks free now or after evicting every unpinned unit."""
        with self._lock:
            return self._blocks.free + self._evictable_blocks()

    def can_allocate(self, nbytes: int, evict: bool = True) -> bool:
        need = self.blocks_for(nbytes)
        with self._lock:
            spare = self._blocks.free + (self._evictable_blocks() if evict else 0)
            return spare >= need

    def allocate(self, kind: UnitKind, nbytes: int, *, key: str | None = None,
                 owner: str | None = None, pin: bool = True, evict: bool = True) -> Unit:
        """A new unit of nbytes in a contiguous run, evicting or compacting if needed."""
        n = self.blocks_for(nbytes)
        with self._lock:
            if self._blocks.free < n and evict:
                self._evict(n - self._blocks.free)
            if self._blocks.free < n:
                spare = self._blocks.free + (self._evictable_blocks() if evict else 0)
                raise PoolFull(self.device, n * self.block_size, spare * self.block_size)
            start = self._blocks.find_run(n)
            if start is None:           # enough blocks, but scattered
                self.compact()
                start = self._blocks.find_run(n)
                assert start is not None
            unit = Unit(next(self._ids), kind, nbytes, start, n, key=key, owner=owner,
                        pins=1 if pin else 0, last_use=time.monotonic())
            self._blocks.take(start, n, unit.id)
            self.prefault.want((start + n) * self.block_size)
            self.units[unit.id] = unit
            if key is not None:
                self.by_key[key] = unit
            self._account(unit, +1)
            return unit

    def release(self, unit: Unit) -> None:
        """Return a unit's blocks at once, pinned or not (its owner is done with it)."""
        with self._lock:
            if not unit.alive:
                return
            unit.alive = False
            del self.units[unit.id]
            if unit.key is not None and self.by_key.get(unit.key) is unit:
                del self.by_key[unit.key]
            self._blocks.give(unit.start, unit.nblocks)
            self._account(unit, -1)

    def pin(self, unit: Unit, times: int = 1) -> None:
        with self._lock:
            unit.pins += times
            unit.last_use = time.monotonic()
            unit.uses += 1

    def unpin(self, unit: Unit, times: int = 1) -> None:
        with self._lock:
            if unit.pins < times:
                raise RuntimeError(f"unit {unit.id} unpinned more often than pinned")
            unit.pins -= times

    def publish(self, unit: Unit, key: str) -> None:
        """Give a unit whose bytes are now final (a full KV page) its content key."""
        with self._lock:
            if unit.key is not None or key in self.by_key or not unit.alive:
                raise ValueError(f"unit {unit.id} cannot be published under {key}")
            unit.key = key
            self.by_key[key] = unit

    def units_of(self, kind: UnitKind) -> list[Unit]:
        """A snapshot of the live units of one kind."""
        with self._lock:
            return [u for u in self.units.values() if u.kind is kind]

    def snapshot(self) -> list[Unit]:
        """(any thread) The units held now."""
        with self._lock:
            return list(self.units.values())

    def lookup(self, key: str) -> Unit | None:
        with self._lock:
            return self.by_key.get(key)

    # ---- eviction and compaction -----------------------------------------------------------
    def evict(self, nbytes: int | None = None) -> int:
        """Evict unpinned units (in policy order) until nbytes are free, or all of them;
        returns the number of units evicted."""
        with self._lock:
            before = self.evictions
            need = (self.num_blocks if nbytes is None
                    else self.blocks_for(nbytes) - self._blocks.free)
            if need > 0:
                self._evict(need)
            return self.evictions - before

    def _evictable_blocks(self) -> int:
        return sum(u.nblocks for u in self.units.values() if u.pins == 0)

    def _evict(self, blocks_needed: int) -> None:
        candidates = [u for u in self.units.values() if u.pins == 0]
        for unit in self.policy(candidates):
            if blocks_needed <= 0:
                break
            blocks_needed -= unit.nblocks
            self.evict_unit(unit)

    def evict_unit(self, unit: Unit) -> None:
        """Evict one unpinned unit now, through the same hooks as pressure would."""
        with self._lock:
            if unit.pins or not unit.alive:
                raise ValueError(f"unit {unit.id} is pinned or gone: it cannot be evicted")
            for hook in self.before_evict:
                hook(unit)
            self.release(unit)
            self.evictions += 1
            for callback in self.on_evict:
                callback(unit)

    def compact(self) -> int:
        """Slide every unit to the lowest free address; returns the number of units moved.

        Moves data, so callers make sure no computation reads the pool meanwhile (the
        engine allocates only on its worker thread, between steps).
        """
        with self._lock:
            if self._frozen:
                raise PoolFull(self.device, 0, 0, "the pool is fragmented and a load is "
                               "copying into it; retry once the load is done")
            moved, cursor = 0, 0
            for unit in sorted(self.units.values(), key=lambda u: u.start):
                if unit.start != cursor:
                    self._move(unit, cursor)
                    moved += 1
                cursor += unit.nblocks
            self.epoch += 1
            return moved

    def _move(self, unit: Unit, dst: int) -> None:
        src, n = unit.start, unit.nblocks
        if self.slab is not None:
            bs = self.block_size
            data = self.slab[src * bs:(src + n) * bs]
            if dst + n > src:           # overlapping ranges: go through a copy
                data = data.clone()
            self.slab[dst * bs:(dst + n) * bs].copy_(data)
        self._blocks.give(src, n)
        self._blocks.take(dst, n, unit.id)
        unit.start = dst

    def freeze(self) -> None:
        """Forbid compaction (units keep their addresses) until thaw()."""
        with self._lock:
            self._frozen += 1

    def thaw(self) -> None:
        with self._lock:
            self._frozen -= 1

    # ---- views -------------------------------------------------------------------------
    def raw(self, unit: Unit) -> torch.Tensor:
        """The unit's bytes as uint8 (readable in before_evict hooks too)."""
        assert self.slab is not None
        begin = unit.start * self.block_size
        return self.slab[begin:begin + unit.nbytes]

    def view(self, unit: Unit, dtype: torch.dtype, shape: Iterable[int]) -> torch.Tensor:
        """A tensor over the unit's bytes; stale after compact() (check self.epoch)."""
        assert self.slab is not None and unit.alive
        shape = tuple(shape)
        begin = unit.start * self.block_size
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if nbytes > unit.nblocks * self.block_size:
            raise ValueError(f"view of {nbytes} bytes exceeds unit {unit.id}")
        return self.slab[begin:begin + nbytes].view(dtype).view(shape)

    def paged_view(self, dtype: torch.dtype, page_shape: tuple[int, ...],
                   page_blocks: int = 1) -> torch.Tensor:
        """The whole slab as pages addressed by first block id: (num_blocks', *page_shape)."""
        assert self.slab is not None
        elems_per_block = self.block_size // dtype.itemsize
        inner = torch.empty(page_shape, device="meta").stride()
        flat = self.slab.view(dtype)
        return flat.as_strided((self.num_blocks - page_blocks + 1, *page_shape),
                               (elems_per_block, *inner))

    def close(self) -> None:
        """Give the slab's memory back once nothing reads it (the server has stopped); the
        bookkeeping stays, as for a pool without storage."""
        with self._lock:
            self.slab = None

    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is free or owned by exactly one unit."""
        with self._lock:
            b = self._blocks
            expected = [-1] * self.num_blocks
            by_kind = dict.fromkeys(UnitKind, 0)
            for unit in self.units.values():
                assert unit.alive and unit.nblocks == self.blocks_for(unit.nbytes), unit
                for i in range(unit.start, unit.start + unit.nblocks):
                    assert expected[i] == -1, f"block {i} owned twice"
                    expected[i] = unit.id
                by_kind[unit.kind] += unit.nblocks * self.block_size
                assert unit.pins >= 0, unit
            assert expected == b.owner, "owner map disagrees with units"
            in_runs = [False] * self.num_blocks
            prev_end = -1
            for start, length in b.free_runs:
                assert length > 0 and start > prev_end, f"free runs unmerged at {start}"
                for i in range(start, start + length):
                    in_runs[i] = True
                prev_end = start + length
            assert in_runs == [o == -1 for o in b.owner], "free runs disagree with owners"
            assert b.free == sum(in_runs), "free count wrong"
            assert by_kind == self._bytes_by_kind, "bytes by kind do not add up"
            for key, unit in self.by_key.items():
                assert unit.key == key and self.units.get(unit.id) is unit, key
