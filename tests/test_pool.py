"""The block pool: bookkeeping properties, compaction, eviction, views."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.pool import BlockPool, PoolFull, UnitKind

BLOCK = 64


def small_pool(blocks: int = 32, storage: bool = True) -> BlockPool:
    return BlockPool("cpu", blocks * BLOCK, BLOCK, storage=storage)


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "pin", "unpin", "compact"]),
                         st.integers(1, 12 * BLOCK), st.sampled_from(list(UnitKind)),
                         st.integers(0, 1000)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_operations_keep_integrity(sequence):
    pool = small_pool(storage=False)
    live = []
    for op, nbytes, kind, pick in sequence:
        if op == "alloc":
            fits = pool.can_allocate(nbytes)
            try:
                live.append(pool.allocate(kind, nbytes, pin=pick % 2 == 0))
                assert fits
            except PoolFull as e:
                assert not fits and e.needed > e.available
            live = [u for u in live if u.alive]     # eviction may have dropped some
        elif live:
            unit = live[pick % len(live)]
            if op == "free":
                pool.release(unit)
                live.remove(unit)
            elif op == "pin":
                pool.pin(unit)
            elif op == "unpin" and unit.pins > 0:
                pool.unpin(unit)
            elif op == "compact":
                pool.compact()
        pool.check_integrity()
        used = sum(u.nblocks for u in pool.units.values())
        assert pool.free_bytes == (pool.num_blocks - used) * BLOCK


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4 * BLOCK), min_size=1, max_size=30), st.data())
def test_no_failure_from_fragmentation(sizes, data):
    """Whenever enough free blocks exist, a contiguous request succeeds (by compaction)."""
    pool = small_pool(storage=False)
    units = [pool.allocate(UnitKind.WEIGHT, n) for n in sizes if pool.can_allocate(n)]
    for unit in data.draw(st.lists(st.sampled_from(units), unique=True)) if units else []:
        pool.release(unit)
    free_blocks = pool.free_bytes // BLOCK
    if free_blocks:
        unit = pool.allocate(UnitKind.KV, free_blocks * BLOCK, evict=False)
        assert unit.nblocks == free_blocks
    pool.check_integrity()


def test_compaction_moves_data_and_bumps_epoch():
    pool = small_pool(8)
    a = pool.allocate(UnitKind.WEIGHT, 2 * BLOCK)
    b = pool.allocate(UnitKind.WEIGHT, 3 * BLOCK)
    c = pool.allocate(UnitKind.WEIGHT, 2 * BLOCK)
    pool.view(b, torch.float32, (3 * BLOCK // 4,)).copy_(torch.arange(48.0))
    pool.view(c, torch.float32, (BLOCK // 2,)).copy_(torch.arange(32.0) * 2)
    pool.release(a)                      # free: blocks 0-1 and 7; 3 free, no run of 3
    epoch = pool.epoch
    d = pool.allocate(UnitKind.WEIGHT, 3 * BLOCK)
    assert pool.epoch == epoch + 1 and (b.start, c.start, d.start) == (0, 3, 5)
    assert torch.equal(pool.view(b, torch.float32, (48,)), torch.arange(48.0))
    assert torch.equal(pool.view(c, torch.float32, (32,)), torch.arange(32.0) * 2)
    pool.check_integrity()


def test_eviction_takes_only_unpinned_units_least_recent_first():
    pool = small_pool(4)
    old = pool.allocate(UnitKind.WEIGHT, BLOCK, pin=False)
    pinned = pool.allocate(UnitKind.WEIGHT, BLOCK)
    new = pool.allocate(UnitKind.WEIGHT, BLOCK, pin=False)
    pool.allocate(UnitKind.WEIGHT, BLOCK)
    evicted = []
    pool.on_evict.append(evicted.append)
    pool.allocate(UnitKind.KV, BLOCK)
    assert evicted == [old] and not old.alive and new.alive and pinned.alive
    with pytest.raises(PoolFull) as err:
        pool.allocate(UnitKind.KV, 2 * BLOCK)
    assert "missing" in str(err.value) and err.value.available == BLOCK
    pool.check_integrity()


def test_bytes_by_kind_and_peak():
    pool = small_pool(16)
    units = [pool.allocate(UnitKind.KV, 10) for _ in range(5)]
    assert pool.bytes_by_kind()["kv"] == 5 * BLOCK
    for unit in units:
        pool.release(unit)
    assert pool.bytes_by_kind()["kv"] == 0 and pool.peak_by_kind()["kv"] == 5 * BLOCK
    pool.release(units[0])               # releasing twice is harmless
    pool.check_integrity()


def test_content_keys_and_pins():
    pool = small_pool(4)
    unit = pool.allocate(UnitKind.WEIGHT, BLOCK, key="abc")
    assert pool.lookup("abc") is unit
    pool.unpin(unit)
    with pytest.raises(RuntimeError):
        pool.unpin(unit)
    pool.release(unit)
    assert pool.lookup("abc") is None
    pool.check_integrity()


def test_paged_view_addresses_pages_by_block():
    pool = small_pool(8)
    pages = [pool.allocate(UnitKind.KV, BLOCK) for _ in range(3)]
    view = pool.paged_view(torch.float32, (2, 8), page_blocks=1)     # 64 bytes a page
    for i, page in enumerate(pages):
        view[page.start] = i + 1
    for i, page in enumerate(pages):
        assert torch.equal(pool.view(page, torch.float32, (2, 8)), torch.full((2, 8), i + 1.0))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        BlockPool("cpu", 1024, 100)
    with pytest.raises(ValueError):
        BlockPool("cpu", 10, 64)
