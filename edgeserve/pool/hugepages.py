"""Host memory for the CPU pool's slab on transparent huge pages, where the kernel offers them.

A decode step streams every weight of a model once. With 4 KiB pages that is a TLB miss
every 4 KiB read; 2 MiB pages take them 512-fold fewer. On the project's CPU VM the
matrix-vector products of a decode step ran 14% (float32) and 16% (int8) faster over
memory in huge pages. The buffer is aligned to 2 MiB and advised with
madvise(MADV_HUGEPAGE) before it is first touched, so that the kernel backs it with huge
pages as it faults in (under THP's `madvise` and `always` settings; under `never`, or off
Linux, it stays in ordinary pages, with the same contents and results).

Faulting those pages in is slow when free memory is fragmented (under THP's `defrag`
setting `madvise`, the kernel compacts memory for each huge page): on the project's CPU VM
a load into a fresh 650 MB pool took 1.0-1.6 s instead of 0.25-0.35 s, depending on the
state of memory. So the slab is faulted in on a background thread, up to 1 GiB ahead of
the highest byte in use (Prefault), off the path of the next load; a load that gets there
first simply faults the pages it writes, as before.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
import weakref
from typing import Any

import torch

HUGE_PAGE = 2 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)
_POPULATE_WRITE = 23                  # MADV_POPULATE_WRITE (Linux 5.14); not in Python 3.11
PREFAULT_CHUNK = 64 << 20
PREFAULT_AHEAD = 1 << 30              # faulted in beyond the highest byte in use


def host_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes of host memory, 2 MiB aligned and advised for huge pages when
    it spans at least one."""
    if nbytes < HUGE_PAGE or _ADVICE is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    out = raw[skip:skip + nbytes]         # the slice keeps the whole allocation alive
    advise(out)
    return out


def advise(t: torch.Tensor) -> bool:
    """Ask for huge pages over the whole pages of t's memory; False where not granted."""
    if _ADVICE is None or not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return False
    return _madvise(start, end - start, _ADVICE)


class Prefault:
    """Keeps a CPU slab's pages faulted in a margin ahead of the highest byte in use (the
    pool takes blocks lowest first), on a background thread that runs only while pages are
    left to fault: madvise(MADV_POPULATE_WRITE) backs them and leaves their contents alone.
    Memory is still committed as models fill the pool, plus at most `ahead` bytes. Off
    Linux, before 5.14, on CUDA, or once the slab is freed, it does nothing."""

    def __init__(self, slab: torch.Tensor | None, ahead: int = PREFAULT_AHEAD) -> None:
        self.caught_up = threading.Event()    # set while every wanted page is faulted in
        self.ahead, self.frontier, self._target = ahead, 0, 0
        self._lock = threading.Lock()
        self._running = self._failed = False
        self.caught_up.set()
        if slab is None or slab.device.type != "cpu" or slab.numel() == 0 \
                or not sys.platform.startswith("linux"):
            self._failed = True
            return
        self._ref = weakref.ref(slab)
        self._skip = slab.data_ptr() % mmap.PAGESIZE      # madvise starts on a page
        self._base = slab.data_ptr() - self._skip
        self._nbytes = slab.numel() * slab.element_size() + self._skip
        self.want(0)

    def want(self, end: int) -> None:
        """The slab's bytes below end are in use: fault in up to `ahead` bytes beyond."""
        if self._failed:
            return
        with self._lock:
            target = min(self._nbytes, self._skip + end + self.ahead)
            have = max(self._target, self.frontier)     # moved in steps, not per block
            step = min(PREFAULT_CHUNK, self.ahead // 4)
            if target <= have or (target < self._nbytes and target - have < step):
                return
            self._target = target
            self.caught_up.clear()
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="edgeserve-prefault", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._failed or self.frontier >= self._target:
                    self._running = False
                    self.caught_up.set()
                    return
                offset = self.frontier
                length = min(PREFAULT_CHUNK, self._target - offset)
            slab = self._ref()           # held through the call: the memory stays mapped
            done = slab is not None and _madvise(self._base + offset, length, _POPULATE_WRITE)
            del slab
            with self._lock:
                if done:
                    self.frontier = offset + length
                else:
                    self._failed = True


@functools.cache
def _libc_madvise() -> Any:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on [start, start + length), start page aligned; releases the GIL."""
    return int(_libc_madvise()(start, length, advice)) == 0
