"""The per-device figures of `EdgeServer.stats()`: bytes by kind, by model and shared."""

from __future__ import annotations

from typing import Any

from edgeserve.blocks.arena import TileArena, arena_stats
from edgeserve.kv.stats import kv_bytes
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool, UnitKind


def pool_stats(pool: BlockPool, models: list[ResidentModel],
               arenas: list[TileArena]) -> dict[str, Any]:
    """One pool's figures; shared bytes are those of units more than one model uses."""
    users: dict[int, int] = {}
    for model in models:
        for unit in model.distinct_units:
            users[unit.id] = users.get(unit.id, 0) + 1
    block = pool.block_size
    weights = [u for u in pool.units.values() if u.kind in (UnitKind.WEIGHT, UnitKind.EXPERT)]
    return {
        "total_bytes": pool.total_bytes, "free_bytes": pool.free_bytes, "block_size": block,
        "bytes_by_kind": pool.bytes_by_kind(), "peak_bytes_by_kind": pool.peak_by_kind(),
        "bytes_by_model": pool.bytes_by_owner(),
        "resident_models": {m.id: m.resident_bytes for m in models},
        "models": {m.id: {"bytes": m.resident_bytes,
                          "shared_bytes": sum(u.nblocks * block for u in m.distinct_units
                                              if users[u.id] > 1),
                          "experts": m.offload.stats() if m.offload is not None else None,
                          "base": m.base,
                          "task_bytes": m.task.nbytes if m.task is not None else 0}
                   for m in models},
        "tasks": arena_stats(arenas),
        "kv": kv_bytes(pool),
        "weight_bytes_unique": sum(u.nblocks * block for u in weights),
        "retained_bytes": sum(u.nblocks * block for u in weights if u.pins == 0),
        "evictions": pool.evictions}
