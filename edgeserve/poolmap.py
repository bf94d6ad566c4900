"""The pool map: a compact snapshot of a pool's units, and the difference between two.

A snapshot row per unit says where it lies and what it is:

    unit id -> (start block, blocks, kind, pins, models using it)

Free blocks are the ones no row covers. A reader that holds the previous snapshot turns it
into the next with `apply(old, diff(old, new))`; a diff names only the units that came,
went or changed, so a quiet pool costs nothing to watch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeserve.pool import BlockPool, Unit

Row = tuple[int, int, str, int, tuple[str, ...]]   # start, nblocks, kind, pins, models


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    device: str
    num_blocks: int
    block_size: int
    units: dict[int, Row]

    @property
    def used_blocks(self) -> int:
        return sum(row[1] for row in self.units.values())

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "units": [[uid, *row[:4], list(row[4])] for uid, row in self.units.items()]}


def snapshot(pool: BlockPool, models_of: Callable[[Unit], tuple[str, ...]]) -> PoolSnapshot:
    """The pool's units now. Safe from any thread: the unit table is copied at once (under
    the GIL) and a unit's fields are read without the pool's lock, so a row may lag a
    change made meanwhile by the step thread; the next snapshot catches up."""
    units = list(pool.units.values())
    rows = {u.id: (u.start, u.nblocks, u.kind.value, u.pins, models_of(u)) for u in units}
    return PoolSnapshot(pool.device, pool.num_blocks, pool.block_size, rows)


def diff(old: PoolSnapshot, new: PoolSnapshot) -> dict[str, Any] | None:
    """What turns `old` into `new`: rows to set and unit ids to drop; None if equal."""
    changed = [[uid, *row[:4], list(row[4])] for uid, row in new.units.items()
               if old.units.get(uid) != row]
    dropped = [uid for uid in old.units if uid not in new.units]
    if not changed and not dropped:
        return None
    return {"device": new.device, "set": changed, "drop": dropped}


def apply(old: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's JSON with a diff applied (the page does the same in JavaScript)."""
    rows = {row[0]: row for row in old["units"]}
    for uid in change["drop"]:
        rows.pop(uid, None)
    for row in change["set"]:
        rows[row[0]] = row
    return old | {"units": list(rows.values())}
