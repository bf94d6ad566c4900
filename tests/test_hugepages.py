"""The CPU pool's slab: 2 MiB aligned host memory advised for transparent huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeserve.pool import BlockPool
from edgeserve.pool.hugepages import HUGE_PAGE, advise, host_buffer

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
