"""Host memory below the device pool: the host tier (unit bytes by content key, least
recently used dropped first; a load's own copies protected while it makes room) and host
slabs (one buffer carved into tensors, page-locked as a whole for copies beside the
computation on CUDA)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger(__name__)


class HostSlab:
    """Host tensors carved from one buffer of exactly their size (64-byte aligned), which can
    be page-locked as a whole for copies that run beside the computation on CUDA.

    Pinning through torch's allocator would round each tensor up to a power of two and keep
    the locked pages cached after release; here `pin` registers the buffer itself (a few
    seconds for tens of GB: call it off the engine thread) and `unpin` gives the pages back.
    Unpinned, copies from it are correct but wait for the host."""

    ALIGN = 64

    def __init__(self, sizes: list[int]) -> None:
        self.nbytes = sum(map(self._aligned, sizes))
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        self.used = 0
        self.pinned = False
        self._unregister: weakref.finalize | None = None

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if self.used + n > self.nbytes:
            raise ValueError(f"host slab of {self.nbytes} bytes has no room for {n} more")
        out = self.buffer[self.used:self.used + n].view(dtype).view(shape)
        self.used += self._aligned(n)
        return out

    @classmethod
    def _aligned(cls, n: int) -> int:
        return -(-n // cls.ALIGN) * cls.ALIGN

    def pin(self) -> bool:
        """Page-lock the buffer for CUDA copies; False where that is not possible."""
        if self.pinned or self.nbytes == 0 or not torch.cuda.is_available():
            return self.pinned
        ptr = self.buffer.data_ptr()
        error = int(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0))
        if error != 0:
            log.warning("could not page-lock %d bytes of host memory (cudaError %d): copies "
                        "from it will wait for the host", self.nbytes, error)
            return False
        self.pinned = True
        # Registered pages must be handed back before the buffer is freed.
        self._unregister = weakref.finalize(self, _host_unregister, ptr)
        return True

    def unpin(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.pinned = False


def _host_unregister(ptr: int) -> None:
    error = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if error != 0:
        log.warning("could not unlock host memory at %#x (cudaError %d)", ptr, error)


class HostTier:
    """Unit bytes kept in host memory by content key, least recently used dropped first."""

    def __init__(self, capacity: int, pinned: bool = False) -> None:
        self.capacity, self.pinned = capacity, pinned
        self.used = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._protected: Counter[str] = Counter()     # keys a load in progress will read

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def clear(self) -> None:
        """Drop every copy (the server has stopped)."""
        with self._lock:
            self._entries.clear()
            self.used = 0

    def put(self, key: str, data: torch.Tensor) -> bool:
        """Keep a copy of data (any device, viewed as bytes); False if it cannot fit."""
        nbytes = data.numel() * data.element_size()
        if not self.fits(nbytes):
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            fits, buf = self._make_room(nbytes)
            if not fits:
                return False
            if buf is None:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            buf.copy_(data.reshape(-1).view(torch.uint8))
            self._entries[key] = buf
            self.used += nbytes
            return True

    def _make_room(self, nbytes: int) -> tuple[bool, torch.Tensor | None]:
        """(lock held) Drop least recently used copies, never protected ones, until nbytes
        fit; False (nothing dropped) if they cannot. A dropped buffer of exactly nbytes that
        nobody reads any more comes back for reuse: its pages are mapped (and pinned)
        already, where a new one would fault in every page again."""
        over = self.used + nbytes - self.capacity
        if over <= 0:
            return True, None
        droppable = [k for k in self._entries if k not in self._protected]
        if sum(self._entries[k].numel() for k in droppable) < over:
            return False, None
        reuse: torch.Tensor | None = None
        for key in droppable:
            if self.used + nbytes <= self.capacity:
                break
            old = self._entries.pop(key)
            self.used -= old.numel()
            if reuse is None and old.numel() == nbytes and sys.getrefcount(old) <= 2:
                reuse = old
            del old
        return True, reuse

    @contextlib.contextmanager
    def protect(self, keys: Iterable[str]) -> Iterator[None]:
        """While a load makes room and reads: its units' copies are never dropped to make
        room for others (the units it evicts are demoted here while it runs)."""
        held = Counter(keys)
        with self._lock:
            self._protected.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._protected.subtract(held)
                self._protected = +self._protected

    def drop(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old.numel()

    def sizes(self) -> set[int]:
        with self._lock:
            return {t.numel() for t in self._entries.values()}

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            buf = self._entries.get(key)
            if buf is not None:
                self._entries.move_to_end(key)
            return buf

    def stats(self) -> dict[str, int]:
        return {"capacity_bytes": self.capacity, "used_bytes": self.used,
                "units": len(self._entries)}
