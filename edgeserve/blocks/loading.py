"""Loading a task's blocks into its pool: one arena per pool, block shape and dtype."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelFormatError, ModelSpec
from edgeserve.blocks.arena import TileArena
from edgeserve.blocks.pack import BLOCKS_FILE, TASK_FILE, TaskPack, is_task_dir
from edgeserve.blocks.task import TaskBlocks, TaskSource, prepare
from edgeserve.checkpoint import HashCache
from edgeserve.engine import Engine
from edgeserve.loader import LoadContext, LoadReport
from edgeserve.pool import BlockPool, PoolFull, Unit
from edgeserve.store import ModelStore, UnknownModel
from edgeserve.tiers import DiskJob, DiskLoader

DIRECT_MIN = 256 << 10      # a run of blocks this large is read straight into the pool


class TaskLoader:
    def __init__(self, engine: Engine, disk: DiskLoader) -> None:
        # Reads in runs of at most 1 MiB: a switch skips the blocks it already holds.
        self.engine = engine
        self.disk = DiskLoader(disk.readers, min(disk.chunk, 1 << 20), disk.pinned)
        self.arenas: dict[tuple[int, tuple[int, int], torch.dtype], TileArena] = {}
        self._sources: dict[Path, tuple[tuple[tuple[str, int, int], ...], TaskSource]] = {}

    def pack(self, model_id: str, path: Path, store: ModelStore) -> TaskPack | None:
        """The pack of a task folder (whose base must be in the store), else None."""
        if not is_task_dir(path):
            return None
        cached = self._sources.get(path)
        if cached is not None and cached[0][0] == _stamp(path / TASK_FILE):
            pack = cached[1].pack
        else:
            pack = TaskPack.read(path)
        try:
            store.path(pack.base)
        except UnknownModel:
            raise ModelFormatError(f"task '{model_id}': its base model '{pack.base}' is not "
                                   f"in the store {store.root}") from None
        return pack

    def source(self, folder: Path, spec: ModelSpec, base_dir: Path,
               hashes: HashCache) -> TaskSource:
        """The pack at folder checked against its base; kept while neither file changes, so
        that switching back to a task reads no metadata again (any thread)."""
        files = [folder / TASK_FILE, folder / BLOCKS_FILE, *sorted(base_dir.glob("*.safetensors"))]
        stamp = tuple(_stamp(f) for f in files if f.exists())
        cached = self._sources.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        source = TaskSource.scan(folder, spec, base_dir, hashes)
        self._sources[folder] = (stamp, source)
        return source

    def arena(self, pool: BlockPool, shape: tuple[int, int], dtype: torch.dtype) -> TileArena:
        key = (id(pool), shape, dtype)
        if key not in self.arenas:
            self.arenas[key] = TileArena(pool, shape, dtype)
        return self.arenas[key]

    async def load(self, owner: str, source: TaskSource, spec: ModelSpec, ctx: LoadContext,
                   report: LoadReport, units: dict[str, Unit],
                   make_room: Callable[[PoolFull], Awaitable[None]]) -> TaskBlocks:
        """Pin the task's resident blocks and read the others; making room as a model load
        does when the pool is short."""
        arena = self.arena(ctx.pool, source.pack.block, ctx.dtype)
        while True:
            try:
                blocks, jobs, fresh = await self.engine.run(_prepare_frozen, source, spec,
                                                            arena, owner, report, units)
                break
            except PoolFull as e:
                await make_room(e)
        try:
            await asyncio.to_thread(self.disk.load, jobs, None, DIRECT_MIN)
        except BaseException:
            await self.engine.run(_undo, blocks, fresh)
            raise
        finally:
            ctx.pool.thaw()
        if blocks.vectors is not None:
            blocks.vectors.fresh = False
        return blocks


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _prepare_frozen(source: TaskSource, spec: ModelSpec, arena: TileArena, owner: str,
                    report: LoadReport, units: dict[str, Unit]
                    ) -> tuple[TaskBlocks, list[DiskJob], list[str]]:
    """prepare(), then no compaction until the disk reads are done: freezing in the same
    engine-thread call leaves no moment in which the jobs' pool views could move."""
    out = prepare(source, spec, arena, owner, report, units)
    arena.pool.freeze()
    return out


def _undo(blocks: TaskBlocks, fresh: list[str]) -> None:
    """A failed fill: what it was reading is not kept under its content key."""
    blocks.arena.forget(fresh)
    if blocks.vectors is not None:
        blocks.vectors.abort()
        blocks.vectors = None
    blocks.release()
