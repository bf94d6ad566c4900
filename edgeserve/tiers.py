"""The tiers below the device pool: host memory, then disk; and the loading pipeline.

    device pool  <- host tier (pinned on CUDA, LRU within a byte budget)  <- disk
Evicted units are demoted to the host tier when it has room; a load takes each unit from
the fastest tier that holds it. Disk reads are large, sequential and overlapped: reader
threads fill staging buffers (pinned on CUDA) ahead of the copies into the pool; where
the bytes need no conversion and the pool is host memory, they are read straight into
their unit with no staging at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import sys
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from edgeserve.checkpoint import Hasher, StreamHashes, TensorInfo, chunks, read_into

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
        droppable = [k for k in self._entries if k not in self._protected]
        over = self.used + nbytes - self.capacity
        if over > 0 and sum(self._entries[k].numel() for k in droppable) < over:
            return False, None
        reuse: torch.Tensor | None = None
        while self.used + nbytes > self.capacity:
            old = self._entries.pop(droppable.pop(0))
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


@dataclass(frozen=True, slots=True)
class DiskJob:
    tensor: TensorInfo
    dest: torch.Tensor       # where its values go (rows of a unit), any dtype and device


class LoadCancelled(Exception):
    """A load's reads were stopped (a prewarm yielding to a real request)."""


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """How one load reads: hash the bytes as they stream in; stop when asked."""

    hashes: StreamHashes | None = None
    stop: threading.Event | None = None

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise LoadCancelled("the load was cancelled")


class DiskLoader:
    """Copies checkpoint tensors into their destinations with overlapped large reads."""

    def __init__(self, readers: int = 4, chunk: int = 32 << 20, pinned: bool = False) -> None:
        self.readers, self.chunk, self.pinned = readers, chunk, pinned

    def load(self, jobs: list[DiskJob], progress: Callable[[int], None] | None = None,
             min_direct: int = 0, options: ReadOptions | None = None) -> None:
        """Jobs of at least min_direct bytes that need no conversion are read straight into
        their destination; the others through large staged reads (many small tensors).
        With options.hashes, the reader threads hash every tensor as they read it."""
        options = options or ReadOptions()
        direct = [j for j in jobs if _direct(j) and j.tensor.nbytes >= min_direct]
        staged = [j for j in jobs if not (_direct(j) and j.tensor.nbytes >= min_direct)]
        with ThreadPoolExecutor(self.readers, thread_name_prefix="edgeserve-read") as pool:
            pending = [pool.submit(self._read_direct, j, progress, options) for j in direct]
            try:
                self._staged(pool, staged, progress, options)
            finally:
                for f in pending:        # every reader is done before the caller goes on
                    f.exception()
            for f in pending:
                f.result()

    def _read_direct(self, job: DiskJob, progress: Callable[[int], None] | None,
                     options: ReadOptions) -> None:
        t = job.tensor
        view = job.dest.view(torch.uint8).reshape(-1).numpy().data
        h = options.hashes.claim(t) if options.hashes is not None else None
        hashing = _Hashing(h) if h is not None else None
        try:
            for offset in range(0, t.nbytes, self.chunk):
                options.check()
                n = min(self.chunk, t.nbytes - offset)
                read_into(t.path, t.start + offset, view[offset:offset + n])
                if hashing is not None:
                    hashing.feed(view[offset:offset + n])
                if progress is not None:
                    progress(n)
        finally:
            if hashing is not None:
                hashing.join()
        if h is not None and options.hashes is not None:
            options.hashes.finish(t, h)

    def _staged(self, pool: ThreadPoolExecutor, jobs: list[DiskJob],
                progress: Callable[[int], None] | None, options: ReadOptions) -> None:
        by_tensor = {id(j.tensor): j for j in jobs}
        ordered = sorted((j.tensor for j in jobs), key=lambda t: (str(t.path), t.start))
        runs = list(chunks(ordered, self.chunk))
        window: list[tuple[list[TensorInfo], Future[torch.Tensor]]] = []
        ahead = self.readers + 1                 # staging buffers in flight at most
        for i, run in enumerate(runs):
            window.append((run, pool.submit(self._read_run, run, options)))
            if len(window) < ahead and i + 1 < len(runs):
                continue
            self._copy(window.pop(0), by_tensor, progress)
        try:
            while window:
                self._copy(window.pop(0), by_tensor, progress)
        finally:
            for _, future in window:      # a failed copy: let the reads in flight end
                future.exception()

    def _read_run(self, run: list[TensorInfo], options: ReadOptions) -> torch.Tensor:
        options.check()
        start, end = run[0].start, run[-1].end
        buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=self.pinned)
        data = buf.numpy()
        read_into(run[0].path, start, data.data)
        if options.hashes is not None:
            for t in run:
                h = options.hashes.claim(t)
                if h is not None:
                    h.update(data[t.start - start:t.end - start])
                    options.hashes.finish(t, h)
        return buf

    @staticmethod
    def _copy(item: tuple[list[TensorInfo], Future[torch.Tensor]], by_tensor: dict[int, DiskJob],
              progress: Callable[[int], None] | None) -> None:
        run, future = item
        buf = future.result()
        base = run[0].start
        for t in run:
            src = buf[t.start - base:t.end - base].view(t.dtype).view(t.shape)
            by_tensor[id(t)].dest.copy_(src)
            if progress is not None:
                progress(t.nbytes)


class _Hashing:
    """Hashes one tensor's chunks, in order, on a thread of its own: the next chunk is read
    while this one is hashed (the hash releases the GIL), so a large tensor costs about
    the longer of its read and its hash, not their sum."""

    def __init__(self, h: Hasher) -> None:
        self.h = h
        self.chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="edgeserve-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.h.update(chunk)

    def feed(self, chunk: memoryview) -> None:
        self.chunks.put(chunk)

    def join(self) -> None:
        self.chunks.put(None)
        self.thread.join()


def _direct(job: DiskJob) -> bool:
    d = job.dest
    return d.device.type == "cpu" and d.dtype == job.tensor.dtype and d.is_contiguous()
