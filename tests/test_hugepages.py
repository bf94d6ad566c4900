"""The CPU pool's slab: 2 MiB aligned host memory advised for transparent huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeserve.pool import BlockPool, UnitKind
from edgeserve.pool.hugepages import HUGE_PAGE, Prefault, advise, host_buffer

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_offered() -> bool:
    return THP.is_file() and "[never]" not in THP.read_text()


def test_a_large_buffer_is_aligned_exact_and_usable() -> None:
    for nbytes in (HUGE_PAGE, 5 * HUGE_PAGE + 12345):
        buf = host_buffer(nbytes)
        assert buf.dtype == torch.uint8 and buf.numel() == nbytes and buf.is_contiguous()
        assert buf.data_ptr() % HUGE_PAGE == 0
        buf.fill_(7)
        buf[-1] = 9
        assert int(buf[:-1].sum()) == 7 * (nbytes - 1) and int(buf[-1]) == 9


def test_a_small_buffer_is_plain_memory() -> None:
    buf = host_buffer(4096)
    assert buf.numel() == 4096 and buf.storage_offset() == 0


@pytest.mark.skipif(not thp_offered(), reason="transparent huge pages are off on this machine")
def test_the_kernel_takes_the_advice() -> None:
    assert advise(host_buffer(4 * HUGE_PAGE))
    assert not advise(torch.empty(100, dtype=torch.uint8))      # no whole page inside


def test_the_cpu_pool_slab_is_aligned_and_its_views_work() -> None:
    pool = BlockPool("cpu", 8 * HUGE_PAGE, 4096)
    assert pool.slab is not None and pool.slab.data_ptr() % HUGE_PAGE == 0
    pages = pool.paged_view(torch.float32, (2, 512))
    assert pages.data_ptr() == pool.slab.data_ptr()           # the slice's offset kept
    pages[3].fill_(1.5)
    assert pool.slab[3 * 4096:4 * 4096].view(torch.float32).eq(1.5).all()
    pool.check_integrity()


def resident_bytes(t: torch.Tensor) -> int:
    """Bytes of t's pages the process has in memory, from /proc/self/smaps (its mapping)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel()
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split(" ", 1)[0]
        if "-" not in span or not all(c in "0123456789abcdef-" for c in span):
            continue
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= start < high:
            assert end <= high, "the buffer spans several mappings"
            rss = next(entry for entry in lines[i + 1:] if entry.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError("no mapping holds the buffer")


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_prefault_backs_pages_ahead_of_use_only_and_keeps_the_contents() -> None:
    buf = host_buffer(32 * HUGE_PAGE)
    assert resident_bytes(buf) < 2 * HUGE_PAGE             # nothing touched yet
    buf[:4096].fill_(3)
    buf[-4096:].fill_(5)
    ahead = Prefault(buf, ahead=8 * HUGE_PAGE)
    assert ahead.caught_up.wait(30)
    assert 8 * HUGE_PAGE <= resident_bytes(buf) < 16 * HUGE_PAGE   # the last page: touched
    ahead.want(20 * HUGE_PAGE)                              # blocks below 40 MiB in use
    assert ahead.caught_up.wait(30) and ahead.frontier == 28 * HUGE_PAGE
    assert resident_bytes(buf) >= 28 * HUGE_PAGE
    ahead.want(100 * HUGE_PAGE)                              # never beyond the buffer
    assert ahead.caught_up.wait(30) and ahead.frontier == buf.numel()
    assert int(buf[:4096].sum()) == 3 * 4096 and int(buf[-4096:].sum()) == 5 * 4096


def test_a_cpu_pool_faults_in_ahead_of_what_it_hands_out() -> None:
    pool = BlockPool("cpu", 8 * HUGE_PAGE, 4096)
    assert pool.prefault.caught_up.wait(30) and pool.prefault.frontier == 8 * HUGE_PAGE
    pool.prefault = Prefault(pool.slab, ahead=HUGE_PAGE)
    pool.allocate(UnitKind.WEIGHT, 3 * HUGE_PAGE)
    assert pool.prefault.caught_up.wait(30) and pool.prefault.frontier == 4 * HUGE_PAGE
    pool.allocate(UnitKind.KV, 4096)                 # a few bytes more: not worth a thread
    assert pool.prefault.caught_up.is_set() and pool.prefault.frontier == 4 * HUGE_PAGE
    assert BlockPool("cpu", 8 * HUGE_PAGE, 4096, storage=False).prefault.caught_up.is_set()
    assert Prefault(torch.empty(0, dtype=torch.uint8)).caught_up.is_set()
