"""The tiers below the device pool: host memory (host_memory.py), then disk; and the
loading pipeline.

    device pool  <- host tier (pinned on CUDA, LRU within a byte budget)  <- disk
Evicted units are demoted to the host tier when it has room; a load takes each unit from
the fastest tier that holds it. Disk reads are large, sequential and overlapped: reader
threads fill staging buffers (pinned on CUDA) ahead of the copies into the pool; where
the bytes need no conversion and the pool is host memory, they are read straight into
their unit with no staging at all.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from edgeserve.checkpoint import Hasher, StreamHashes, TensorInfo, chunks, read_into
from edgeserve.host_memory import HostSlab as HostSlab
from edgeserve.host_memory import HostTier as HostTier

log = logging.getLogger(__name__)


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


def default_readers() -> int:
    """Reader threads for a load: one per core this process may run on, at most 4. Reads
    from the page cache are copies, bound by the CPU: on two cores, four readers took the
    cores from the forwards of resident models (four requests for resident models during a
    load: 39 ms to their last first token with four readers, 30 ms with two, 22 ms alone),
    while a 0.5 GB load took about as long with two (0.35 s against 0.33 s); one reader
    could not hide a first sight's hashing (1.5x the load with cached hashes)."""
    from edgeserve.engine.threads import cpu_count  # (the engine imports this module)

    return max(1, min(4, cpu_count()))


class DiskLoader:
    """Copies checkpoint tensors into their destinations with overlapped large reads."""

    def __init__(self, readers: int | None = None, chunk: int = 32 << 20,
                 pinned: bool = False) -> None:
        self.readers = default_readers() if readers is None else readers
        self.chunk, self.pinned = chunk, pinned

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
        # a tensor of several chunks is hashed on a thread of its own, overlapping its next
        # read; one of a single chunk right here (the other readers keep the disk busy)
        hashing = _Hashing(h) if h is not None and t.nbytes > self.chunk else None
        try:
            for offset in range(0, t.nbytes, self.chunk):
                options.check()
                n = min(self.chunk, t.nbytes - offset)
                read_into(t.path, t.start + offset, view[offset:offset + n])
                if hashing is not None:
                    hashing.feed(view[offset:offset + n])
                elif h is not None:
                    h.update(view[offset:offset + n])
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
