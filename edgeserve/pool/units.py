"""What the pool holds: units, their kinds, and the error when it is full."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from edgeserve.config import format_size


class UnitKind(StrEnum):
    WEIGHT = "weight"
    TASK_BLOCK = "task_block"
    EXPERT = "expert"
    KV = "kv"


@dataclass(eq=False, slots=True)
class Unit:
    id: int
    kind: UnitKind
    nbytes: int
    start: int                  # first block; changes when compaction moves the unit
    nblocks: int
    key: str | None = None      # content hash of immutable units
    owner: str | None = None    # model id that created it
    pins: int = 0               # > 0: in use (loaded model or running step), never evicted
    last_use: float = 0.0
    uses: int = 0
    importance: float = 0.0
    reload_cost: float = 0.0
    alive: bool = True


class PoolFull(MemoryError):
    """Not enough free blocks, even after evicting every unpinned unit."""

    def __init__(self, device: str, needed: int, available: int, reason: str = "") -> None:
        self.needed, self.available = needed, available
        super().__init__((reason and f"{device}: {reason}") or
            f"{device}: pool needs {format_size(needed)} more but only {format_size(available)} "
            f"can be freed (missing {format_size(needed - available)})")


# Chooses, among unpinned units, which to drop first; returns them in eviction order.
EvictionPolicy = Callable[[list[Unit]], list[Unit]]


def lru_order(units: list[Unit]) -> list[Unit]:
    return sorted(units, key=lambda u: u.last_use)
