"""Loading a task's blocks into its pool: one arena per pool, block shape and dtype."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import torch

from edgeserve.arch.spec import ModelSpec
from edgeserve.blocks.arena import TileArena
from edgeserve.blocks.task import TaskBlocks, TaskSource, prepare
from edgeserve.engine import Engine
from edgeserve.loader import LoadContext, LoadReport
from edgeserve.pool import BlockPool, PoolFull
from edgeserve.tiers import DiskLoader


class TaskLoader:
    def __init__(self, engine: Engine, disk: DiskLoader) -> None:
        # Reads in runs of at most 1 MiB: a switch skips the blocks it already holds.
        self.engine = engine
        self.disk = DiskLoader(disk.readers, min(disk.chunk, 1 << 20), disk.pinned)
        self.arenas: dict[tuple[int, tuple[int, int], torch.dtype], TileArena] = {}

    def arena(self, pool: BlockPool, shape: tuple[int, int], dtype: torch.dtype) -> TileArena:
        key = (id(pool), shape, dtype)
        if key not in self.arenas:
            self.arenas[key] = TileArena(pool, shape, dtype)
        return self.arenas[key]

    async def load(self, owner: str, source: TaskSource, spec: ModelSpec, ctx: LoadContext,
                   report: LoadReport,
                   make_room: Callable[[PoolFull], Awaitable[None]]) -> TaskBlocks:
        """Pin the task's resident blocks and read the others; making room as a model load
        does when the pool is short."""
        arena = self.arena(ctx.pool, source.pack.block, ctx.dtype)
        while True:
            try:
                blocks, jobs, fresh = await self.engine.run(prepare, source, spec, arena,
                                                            owner, report)
                break
            except PoolFull as e:
                await make_room(e)
        ctx.pool.freeze()
        try:
            await asyncio.to_thread(self.disk.load, jobs, None, False)
        except BaseException:
            await self.engine.run(_undo, blocks, fresh)
            raise
        finally:
            ctx.pool.thaw()
        return blocks


def _undo(blocks: TaskBlocks, fresh: list[str]) -> None:
    blocks.arena.forget(fresh)
    blocks.release()
