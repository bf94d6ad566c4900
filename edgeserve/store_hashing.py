"""Store hashing: the store's never-hashed checkpoint files hashed in idle time.

A load must know a file's tensor hashes before it can match its units against resident
ones; a file never seen is hashed whole before such a load (or as a load with nothing to
match reads it, first_sight.py). In idle time, the same idle time prewarming uses (no
running or waiting sequence, no load in progress, no load turn held: `Prewarmer.idle`),
this hashes the files of the store whose hashes are not cached yet, into the loader's
HashCache, with the loader's hash (`tensor_hasher`), so that their first load finds them.

It yields at once to real work: a request or a load stops it between two chunks of
CHUNK bytes (read and hashed in a fraction of a millisecond), and a file stopped half way
resumes where it stopped. Files most likely asked for go first: those of models whose
tensors have the shapes of a resident model's (they may share its units, so their load
would hash them whole first), then by demand. The bases of task packs are hashed with
blake2b too (a pack is checked against its base's blake2b hashes). A policy that neither
shares nor retains units has no use for keys: nothing is hashed for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.pack import TaskPack, is_task_dir
from edgeserve.checkpoint import ALGORITHM, HashCache, Hasher, read_header, read_into, tensor_hasher
from edgeserve.loader import read_spec, scan_checkpoint
from edgeserve.quant.format import read_quant

if TYPE_CHECKING:
    from edgeserve.scheduler import Scheduler

log = logging.getLogger("edgeserve.store_hashing")
CHUNK = 1 << 20      # bytes read and hashed between two looks at the server's work
TICK = 0.01          # seconds between two looks for idle time
QUIET = 0.02         # seconds after the last request or load before hashing starts
RESCAN = 2.0         # seconds between two looks at the store once everything is hashed

Job = tuple[Path, str]          # a checkpoint file and the algorithm to hash it with
Shapes = frozenset[tuple[str, tuple[int, ...]]]


class FileHashing:
    """One file's tensor hashes computed a chunk at a time; resumable at any chunk."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.path, self.algorithm = path, algorithm
        self.stamp = HashCache.stamp(path)          # taken before the first read
        tensors = read_header(path)
        self.hashers: dict[str, Hasher] = {t.name: tensor_hasher(t, algorithm) for t in tensors}
        self.chunks = [(t.name, offset, min(CHUNK, t.end - offset))
                       for t in tensors for offset in range(t.start, t.end, CHUNK)]
        self.next = 0
        self.nbytes = 0
        self._buffer = bytearray(CHUNK)

    @property
    def done(self) -> bool:
        return self.next == len(self.chunks)

    def step(self) -> None:
        """Read and hash the next chunk."""
        name, offset, length = self.chunks[self.next]
        view = memoryview(self._buffer)[:length]
        read_into(self.path, offset, view)
        self.hashers[name].update(view)
        self.next += 1
        self.nbytes += length

    def hashes(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self.hashers.items()}


def model_files(path: Path) -> list[Job]:
    """The files of one store entry whose tensor hashes its load would need."""
    if is_task_dir(path):
        pack = TaskPack.read(path)
        base = path.parent / pack.base
        if not pack.base_hash or not (base / "config.json").is_file():
            return []
        return [(f, "blake2b") for f in sorted({t.path for t in scan_checkpoint(base).values()})]
    if not (path / "config.json").is_file():
        return []                   # a GGUF model not converted yet
    info = read_quant(path)
    if info is not None and all(p in info.hashes for u in weight_plan(read_spec(path)).values()
                                for p in u.parts):
        return []                   # keys come from the hashes quant.json records
    return [(f, ALGORITHM) for f in sorted({t.path for t in scan_checkpoint(path).values()})]


def shapes(path: Path) -> Shapes:
    """The (dtype, shape) of every tensor of a model folder."""
    try:
        return frozenset((str(t.dtype), t.shape) for t in scan_checkpoint(path).values())
    except (ModelFormatError, OSError):
        return frozenset()


def plan(entries: Iterable[tuple[str, Path]], hashes: HashCache, resident: Iterable[Path],
         demand: dict[str, float], going: Callable[[], bool] = lambda: True
         ) -> list[Job] | None:
    """(any thread) The files not hashed yet, most likely needed first: models whose tensors
    have a resident model's shapes, then by demand, then in store order. None when
    `going` turned false on the way (real work came: the plan is made again later)."""
    held: set[tuple[str, tuple[int, ...]]] = set().union(*(shapes(p) for p in resident))
    ranked: list[tuple[bool, float, int, list[Job]]] = []
    for order, (model_id, path) in enumerate(entries):
        if not going():
            return None
        try:
            jobs = [j for j in model_files(path) if hashes.cached(*j) is None]
        except (ModelFormatError, OSError, ValueError):
            continue                # a broken entry: its load will say why
        if jobs:
            related = bool(held & shapes(jobs[0][0].parent))
            ranked.append((not related, -demand.get(model_id, 0.0), order, jobs))
    seen: set[Job] = set()
    out = []
    for *_, jobs in sorted(ranked, key=lambda r: r[:3]):
        for job in jobs:
            if job not in seen:
                seen.add(job)
                out.append(job)
    return out


class StoreHashing:
    def __init__(self, scheduler: Scheduler, enabled: bool = True) -> None:
        self.s = scheduler
        self.enabled = enabled and (scheduler.policy.share or scheduler.policy.retain)
        self.counts = dict.fromkeys(("files", "bytes", "yielded"), 0)
        self.jobs: list[Job] = []
        self.current: FileHashing | None = None
        self.go = threading.Event()          # set while a window may hash; cleared by demand
        self.last_demand = -float("inf")
        self.scanned = -float("inf")
        self._task: asyncio.Task[None] | None = None

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self.go.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def demand(self) -> None:
        """A request or a load: hashing stops before its next chunk."""
        self.go.clear()
        self.last_demand = time.monotonic()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except Exception:               # a failed pass must not end the loop
                log.exception("idle hashing failed")
                await asyncio.sleep(RESCAN)

    # ---- idle time ---------------------------------------------------------------------
    def idle(self) -> bool:
        """(any thread) Prewarming's idle time, no prewarm running, and nothing asked for
        since go was set."""
        return self.go.is_set() and self._quiet()

    def _quiet(self) -> bool:
        return self.s.prewarm.idle() and self.s.prewarm.current is None

    async def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        s = self.s
        if not self.enabled or now - self.last_demand < QUIET or not self._quiet():
            return
        self.go.set()
        if not self.jobs and self.current is None:
            if now - self.scanned < RESCAN:
                return
            resident = [m.path for m in s.models.values()]
            demand = {m: s.ctx.demand.score(m) for m in s.prewarm.history.models()}
            jobs = await asyncio.to_thread(self._plan, resident, demand)
            if jobs is None:
                return
            self.jobs, self.scanned = jobs, now
        await asyncio.to_thread(self.window)

    def _plan(self, resident: list[Path], demand: dict[str, float]) -> list[Job] | None:
        entries = [(m.id, m.path) for m in self.s.store.list() if m.tag is None]
        return plan(entries, self.s.hashes, resident, demand, self.idle)

    def window(self) -> None:
        """(a worker thread) Hash chunk after chunk while the server stays idle."""
        while self.idle():
            if self.current is None:
                if not self.jobs:
                    return
                path, algorithm = self.jobs.pop(0)
                if self.s.hashes.cached(path, algorithm) is not None:
                    continue
                with contextlib.suppress(OSError, ModelFormatError):
                    self.current = FileHashing(path, algorithm)
                continue
            file = self.current
            try:
                if not file.done:
                    file.step()
                if file.done:
                    self._finish(file)
            except (OSError, ModelFormatError):
                self.current = None         # gone or changed under us: the next scan sees
        if self.current is not None:
            self.counts["yielded"] += 1

    def _finish(self, file: FileHashing) -> None:
        self.current = None
        cache = self.s.hashes
        if HashCache.stamp(file.path) != file.stamp:     # changed while hashed: once more
            self.jobs.insert(0, (file.path, file.algorithm))
        elif cache.cached(file.path, file.algorithm) is None:   # or a load streamed it
            cache.put(file.path, file.hashes(), file.algorithm, file.stamp)
            self.counts["files"] += 1
            self.counts["bytes"] += file.nbytes
            log.debug("hashed %s in idle time (%d bytes)", file.path, file.nbytes)

    def stats(self) -> dict[str, int | bool]:
        return {"enabled": self.enabled, **self.counts,
                "pending": len(self.jobs) + (self.current is not None)}
